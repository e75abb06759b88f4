"""The web page at / (static/index.html: generate, sweep, upload, train)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
router = APIRouter()


@router.get("/")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")
