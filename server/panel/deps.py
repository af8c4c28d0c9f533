"""Dependencies of the panel routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.panel.runtime import PanelRuntime

__all__ = ["PanelDep", "get_panel"]


def get_panel(request: Request) -> PanelRuntime:
    panel: PanelRuntime = request.app.state.panel
    return panel


PanelDep = Annotated[PanelRuntime, Depends(get_panel)]
