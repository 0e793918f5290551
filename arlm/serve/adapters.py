"""LoRA adapters added to a running server and removed from it, as vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` do (``--allow-runtime-lora-updates``;
room for them from ``--max-cpu-loras``). The files are read and checked in a thread of their
own; the adapter joins the engine's store (``arlm.model.adapter_store``) in the engine's loop
thread between steps (``AsyncEngine.call``), so no request names one before it is whole. An
adapter's prefix-cache blocks never serve another, nor one added later under its name
(``AdapterStore.key``)."""

from __future__ import annotations

import asyncio

from fastapi.responses import PlainTextResponse

from arlm.engine import AdapterBusy, InvalidRequest
from arlm.formats.read import read_lora_module
from arlm.serve.errors import APIError
from arlm.serve.protocol import _Body


class LoadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are what arlm's slots go by


async def load(server, req: LoadLoRAAdapterRequest) -> PlainTextResponse:
    """Read ``req.lora_path`` and serve it as ``req.lora_name``: 200, or 400 saying why not
    (not an adapter, not of this model, the name taken, no room)."""
    lm, name = server.lm, req.lora_name  # the server has slots (Server.attach checks)
    if name == server.model_name:
        raise APIError.bad_request(
            f"lora_name {name!r} is the served model's own name; name the adapter otherwise",
            "lora_name",
        )
    try:
        adapter = await asyncio.to_thread(read_lora_module, lm.model, name, req.lora_path)
        await server.front.call(lambda: lm.adapters.add(name, adapter))
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise APIError.bad_request(e, "lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload(server, req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    """Stop serving ``req.lora_name``: 200, 404 when none is loaded by that name, 409 while
    requests still run on it."""
    lm, name = server.lm, req.lora_name
    try:
        await server.front.call(lambda: lm.unload_adapter(name))
    except AdapterBusy as e:
        raise APIError(409, str(e), param="lora_name") from None
    except (InvalidRequest, ValueError) as e:
        raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
