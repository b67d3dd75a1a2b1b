"""``/v1/compressors``: every registered compressor and the JSON schema of its parameters.

The schemas come from ``gradwire.compressors.config_schemas()``, which reads the torch-free config
models only; serving them never imports torch.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from gradwire.server.auth import get_services
from gradwire.server.control import Services

__all__ = ["CompressorList", "router"]

router = APIRouter(prefix="/compressors", tags=["compressors"])


class CompressorList(BaseModel):
    compressors: dict[str, dict[str, Any]] = Field(
        description="compressor name → JSON schema of its parameters (the keys beside compression.name)"
    )


@router.get("", response_model=CompressorList, summary="List compressors with their parameter schemas")
def list_compressors(services: Annotated[Services, Depends(get_services)]) -> CompressorList:
    return CompressorList(compressors=services.compressor_schemas)
