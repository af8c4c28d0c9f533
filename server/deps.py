"""FastAPI dependencies as ``Annotated`` aliases (routers stay thin).

The ones that do no IO are ``async def``: FastAPI runs a plain ``def`` dependency in the
threadpool, a hop that costs more than the dependency itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from server.central import Central

__all__ = ["CentralDep", "NowDep", "SessionDep", "get_central", "get_db", "get_now"]


async def get_central(request: Request) -> Central:
    central: Central = request.app.state.central
    return central


CentralDep = Annotated[Central, Depends(get_central)]


def get_db(central: CentralDep) -> Iterator[Session]:
    """A database session per request; routers commit what they change."""
    with Session(central.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


async def get_now(central: CentralDep) -> datetime:
    return central.clock.now()


NowDep = Annotated[datetime, Depends(get_now)]
