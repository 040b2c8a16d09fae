"""Every NATS subject tsukimi uses. The version segment changes when a message schema changes incompatibly."""

PREFIX = "tsukimi.v2"

# Gateway -> conductor, request/reply (`GenerateRequest` -> `SubmitReply`); conductors share a queue group.
SUBMIT = f"{PREFIX}.conductor.submit"
CONDUCTOR_QUEUE = "conductor"
# Instance -> everyone: `Heartbeat`, on `heartbeat.<kind>.<instance id>`.
HEARTBEAT = f"{PREFIX}.heartbeat"
HEARTBEAT_ALL = f"{HEARTBEAT}.>"
# Gateway -> every worker and conductor: `CancelRequest` (client gone, stop string hit, timeout).
CANCEL = f"{PREFIX}.cancel"
# Pool master -> everyone: `PoolEvents` (blocks stored in / removed from the KV cache pool).
POOL_EVENTS = f"{PREFIX}.pool.events"
# Anyone -> pool master, request/reply (`PoolSnapshotRequest` -> `PoolSnapshot`): resynchronisation.
POOL_SNAPSHOT = f"{PREFIX}.pool.snapshot"


def heartbeat(kind: str, instance_id: str) -> str:
    """Subject an instance heartbeats on."""
    return f"{HEARTBEAT}.{kind}.{instance_id}"


def prefill_tasks(instance_id: str) -> str:
    """Conductor -> one prefill worker, request/reply (`PrefillTask` -> `TaskAck`)."""
    return f"{PREFIX}.prefill.{instance_id}.tasks"


def decode_reserve(instance_id: str) -> str:
    """Prefill -> one decode worker, request/reply (`KVReserve` -> `KVReservation`), before writing KV."""
    return f"{PREFIX}.decode.{instance_id}.reserve"


def decode_release(instance_id: str) -> str:
    """Prefill -> one decode worker (`KVRelease`): a reservation will not be handed over; its writes are over."""
    return f"{PREFIX}.decode.{instance_id}.release"


def decode_renew(instance_id: str) -> str:
    """Prefill -> one decode worker (`KVRenew`): the reservations it holds are alive; not to be freed as orphans."""
    return f"{PREFIX}.decode.{instance_id}.renew"


def decode_tasks(instance_id: str) -> str:
    """Prefill -> one decode worker, request/reply (`DecodeTask` -> `TaskAck`), after the KV has arrived."""
    return f"{PREFIX}.decode.{instance_id}.tasks"


def stream(request_id: str) -> str:
    """Workers -> the gateway holding the request: `TokenEvent`s of one request."""
    return f"{PREFIX}.stream.{request_id}"
