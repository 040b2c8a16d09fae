"""The conductor's request journal: one row per request it placed or refused (SQLite or PostgreSQL)."""

from __future__ import annotations

import time

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, create_engine, func, insert, select

metadata = MetaData()

requests_table = Table(
    "requests",
    metadata,
    # Gateway-assigned request id.
    Column("request_id", String(128), primary_key=True),
    # Served model name.
    Column("model", String(256), nullable=False),
    # Prompt length in tokens.
    Column("num_prompt_tokens", Integer, nullable=False),
    # "placed" or "refused".
    Column("status", String(32), nullable=False),
    # Chosen instances (null when refused).
    Column("prefill_id", String(256)),
    Column("decode_id", String(256)),
    # Why it was refused.
    Column("error_code", String(64)),
    # Unix times: arrival at the gateway, decision here.
    Column("arrival_time", Float, nullable=False),
    Column("decided_at", Float, nullable=False),
)


class RequestJournal:
    """Appends placement decisions; blocking calls (run them off the event loop)."""

    def __init__(self, url: str):
        connect_args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        metadata.create_all(self.engine)

    def record(self, request_id: str, model: str, num_prompt_tokens: int, status: str, arrival_time: float,
               prefill_id: str | None = None, decode_id: str | None = None, error_code: str | None = None) -> None:
        """Appends one decision."""
        with self.engine.begin() as conn:
            conn.execute(insert(requests_table).values(
                request_id=request_id, model=model, num_prompt_tokens=num_prompt_tokens, status=status,
                prefill_id=prefill_id, decode_id=decode_id, error_code=error_code, arrival_time=arrival_time,
                decided_at=time.time(),
            ))

    def count(self, status: str | None = None) -> int:
        """Rows recorded, optionally of one status."""
        query = select(func.count()).select_from(requests_table)
        if status:
            query = query.where(requests_table.c.status == status)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def close(self) -> None:
        self.engine.dispose()
