"""HTTP API under ``/blockmerge/v1/`` (added in ``on_app_started`` when the WebUI runs with --api or --nowebui).

Bodies are plain JSON objects with the CLI's names, validated here so that ``detail`` is always one string.
Routes that touch the model take the WebUI's ``queue_lock`` and begin/end a job, so two requests never
interleave with each other or with generation. Errors: 422 bad value, 409 conflict, 503 unsupported host.
"""
from __future__ import annotations

import base64
import binascii
import secrets
import time
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from .. import presets
from ..arch import ARCHS
from ..errors import MergeError, MergeInterrupted
from . import host
from .params import flag
from .service import SERVICE, Conflict, Unsupported

PREFIX = "/blockmerge/v1"


def _error_response(status: int, detail: str):
    return JSONResponse(status_code=status, content={"detail": detail})


def status_for(e: MergeError) -> int:
    if isinstance(e, Unsupported):
        return 503
    if isinstance(e, (Conflict, MergeInterrupted)):
        return 409
    return 422


def _check_auth(request) -> bool:
    creds = getattr(host._m("shared").cmd_opts, "api_auth", None)
    if not creds:
        return True
    allowed = {}
    for pair in str(creds).strip().split(","):
        if ":" in pair:
            u, pw = pair.strip().split(":", 1)
            allowed[u] = pw
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, pw = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    want = allowed.get(user)
    return want is not None and secrets.compare_digest(want, pw)


def add_routes(app) -> None:
    if any(getattr(r, "path", "").startswith(PREFIX) for r in app.routes):
        return  # Reload UI: routes already there

    def guarded(fn: Callable[..., dict], lock: bool, takes_body: bool):
        async def read_body(request: Request) -> Any:
            raw = await request.body()
            if not raw:
                return {}
            import json
            try:
                return json.loads(raw)
            except ValueError:
                return None

        def call(request: Request, body: Any):
            if not _check_auth(request):
                return JSONResponse(status_code=401, content={"detail": "authentication required"},
                                    headers={"WWW-Authenticate": "Basic"})
            if takes_body and not isinstance(body, dict):
                return _error_response(422, "the request body must be a JSON object")
            t0 = time.perf_counter()
            waited = 0.0
            try:
                if lock:
                    with host.queue_lock():
                        waited = time.perf_counter() - t0  # behind a generation or another request
                        st = host.state()
                        st.begin(job="blockmerge")
                        try:
                            out = fn(body) if takes_body else fn()
                        finally:
                            st.end()
                else:
                    out = fn(body) if takes_body else fn()
            except MergeError as e:
                return _error_response(status_for(e), str(e))
            out.setdefault("seconds", round(time.perf_counter() - t0, 3))
            if lock:
                out["queue_wait"] = round(waited, 3)
            return JSONResponse(content=out)

        if takes_body:
            async def endpoint(request: Request):
                body = await read_body(request)
                from starlette.concurrency import run_in_threadpool
                return await run_in_threadpool(call, request, body)
        else:
            def endpoint(request: Request):
                return call(request, None)
        return endpoint

    routes = [
        ("POST", "merge", lambda b: SERVICE.merge_file(b), True, True),
        ("POST", "test", lambda b: SERVICE.test_merge(b), True, True),
        ("POST", "save", save_route, True, True),
        ("POST", "restore", lambda b: SERVICE.restore(), True, True),
        ("POST", "free", lambda b: SERVICE.free(), True, True),
        ("GET", "presets", presets_route, False, False),
        ("GET", "status", lambda: SERVICE.status(), False, False),
        ("GET", "recipe", recipe_route, False, False),
        ("GET", "fingerprint", lambda: SERVICE.fingerprint(), True, False),
        ("POST", "lora/extract", lambda b: SERVICE.lora_extract(b), True, True),
        ("POST", "lora/merge", lambda b: SERVICE.lora_merge(b), True, True),
    ]
    for method, name, fn, lock, takes_body in routes:
        app.add_api_route(f"{PREFIX}/{name}", guarded(fn, lock, takes_body), methods=[method])


def save_route(body: dict) -> dict:
    unknown = sorted(set(body) - {"output", "overwrite", "dtype", "vae"})
    if unknown:
        raise MergeError(f"unknown field, {unknown[0]}")
    return SERVICE.save(body.get("output"), flag(body, "overwrite"), body.get("dtype"), body.get("vae"))


def presets_route() -> dict:
    out = {}
    for arch in ("sd1", "sdxl"):
        table = {**presets.table("sd1"), **(presets.table("sdxl") if arch == "sdxl" else {})}
        out[arch] = {}
        for name in presets.names(arch):
            out[arch][name] = {"values": presets.resolve(name, ARCHS[arch]), "source": table[name].source}
    return {"presets": out, "user_file": str(presets.user_presets_path())}


def recipe_route() -> dict:
    live = SERVICE.status()["live"]
    return {"live": live, "recipe": SERVICE.recipe_json() if live else SERVICE.base_params}
