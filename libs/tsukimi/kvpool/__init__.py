"""The KV cache pool's client: block keys and checksums, the index view, the session and its lane, `PoolClient`,
and the model-facing prefix cache (load / store) the workers share."""
