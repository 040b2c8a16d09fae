"""The decode reservations a prefill worker holds: from the reservation until the task is handed over or the
blocks are released. Its renewals name them, so the decode workers keep them while this worker is alive."""

from __future__ import annotations


class HeldReservations:
    """Request ids with a reservation held, per decode worker."""

    def __init__(self) -> None:
        self._by_decode: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_decode.values())

    def add(self, decode_id: str, request_id: str) -> None:
        """`request_id` holds a reservation on `decode_id`."""
        self._by_decode.setdefault(decode_id, set()).add(request_id)

    def discard(self, decode_id: str, request_id: str) -> None:
        """`request_id`'s reservation on `decode_id` is handed over or released (or never was)."""
        ids = self._by_decode.get(decode_id)
        if ids is None:
            return
        ids.discard(request_id)
        if not ids:
            del self._by_decode[decode_id]

    def by_decode(self) -> dict[str, list[str]]:
        """Per decode worker holding some, the request ids (sorted): what to renew there."""
        return {decode_id: sorted(ids) for decode_id, ids in self._by_decode.items()}
