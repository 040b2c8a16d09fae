"""The cachestore service: for now a liveness-only member of the cluster (heartbeats, gRPC health, probes).

The distributed KV block pool it will serve comes later; nothing here pretends to store blocks yet.
"""
