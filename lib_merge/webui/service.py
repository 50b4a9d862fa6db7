"""The live test merge in the WebUI: one state object shared by the tab, the API and the X/Y/Z axes.

Callers hold the WebUI's ``queue_lock`` (tab buttons through ``wrap_gradio_gpu_call``, API routes with
``with queue_lock``); nothing here takes it, so it can never deadlock on the non-re-entrant FIFOLock.
"""
from __future__ import annotations

import json
import hashlib
import os
import shutil
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..arch import ARCHS, block_of
from .. import presets
from ..errors import MergeError
from ..live import CachePolicy, LiveSession
from ..merge import merge_to_file
from ..options import DEFAULT_SAVE_DTYPE
from ..recipe import Recipe
from ..weights import parse_weights
from . import host
from .chain import describe, first_a, map_models, model_slots, pin_first_a, step_body
from .names import output_path
from .params import flag, to_recipe


class Conflict(MergeError):
    """The request is valid but cannot run now (another model is loaded, …): HTTP 409."""


class Unsupported(MergeError):
    """The host or loaded model cannot do a live merge: HTTP 503."""


def lora_note(items: list[dict] | None) -> str:
    """"; LoRAs baked: a.safetensors 0.8, b.safetensors 1 (blocks OUTALL)" for the status line (canonical items)."""
    if not items:
        return ""
    parts = []
    for e in items:
        blocks = e.get("blocks")
        shown = blocks if isinstance(blocks, str) else (",".join(f"{v:g}" for v in blocks) if blocks else "")
        parts.append(f"{e['name']} {e['strength']:g}" + (f" (blocks {shown})" if shown else ""))
    return "; LoRAs baked: " + ", ".join(parts)


def size_text(n: int) -> str:
    """Bytes for the status line: "1.97 GB", "512 MB", "40 kB"."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 or n == 0 else f"{n / 1e3:.0f} kB"


def cache_note(status: dict) -> str:
    """"; caches 1.97 GB" (and what the background copy still adds) for the status line."""
    held, pending = status.get("cache_bytes") or 0, status.get("cache_pending_bytes") or 0
    return f"; caches {size_text(held + pending)}" + (f" ({size_text(pending)} still being copied into RAM)"
                                                      if pending else "")


class Service:
    def __init__(self):
        self.session: LiveSession | None = None
        self.model_ref = None
        self.base_params: dict | None = None  # settings of the last Test merge (kept after Restore)
        self.live_params: dict | None = None  # settings of the merge that is live now
        self.generation_params: dict | None = None  # the merge the running generation started with
        self.progress = {"stage": "idle", "done": 0, "total": 0}
        self.sentinels: dict[str, torch.Tensor] = {}
        self.file_bytes_read: dict[str, int] = {}
        self.last_message = ""
        self.xyz_failure: str | None = None
        self.xyz_cells: list[dict] = []
        self.chain_base: dict | None = None  # the tab's "Merge again from the preview": model A of its next merges

    # -- helpers ------------------------------------------------------------------------------------------
    def _progress(self, stage: str, done: int = 0, total: int = 0) -> None:
        self.progress = {"stage": stage, "done": done, "total": total}
        st = host.state()
        try:
            st.textinfo = f"BlockMerge: {stage}" + (f" {done}/{total}" if total else "")
        except Exception:
            pass

    @staticmethod
    def resolve_model(name: str, field: str) -> str:
        return host.checkpoint_by_name(name, field).filename

    @staticmethod
    def lora_resolver() -> Callable[[Any, str], str]:
        """``(name, field) -> path`` for the request's ``lora`` names: looked up in the LoRA folder's listing,
        read once per request, exactly as ``lora/merge`` looks up its inputs (never joined onto a path)."""
        from . import lora  # imports this module's Conflict
        files: dict | None = None

        def resolve(name: Any, field: str) -> str:
            nonlocal files
            if files is None:
                files = lora.lora_files()
            return str(lora.resolve_lora(name, field, files))
        return resolve

    @staticmethod
    def canonical_lora(items: list[dict]) -> list[dict]:
        """The ``lora`` field as the LoRA list names its files (``x`` -> ``x.safetensors``), strength filled in,
        blocks only where given: two requests that bake the same LoRAs read the same."""
        from . import lora
        files = lora.lora_files()
        names = {os.path.realpath(p): n for n, p in files.items()}
        out = []
        for i, item in enumerate(items):
            path = lora.resolve_lora(item.get("name"), f"lora[{i}].name", files)
            entry: dict[str, Any] = {"name": names[os.path.realpath(path)],
                                     "strength": float(1.0 if item.get("strength") is None else item["strength"])}
            blocks = item.get("blocks")
            if blocks is not None and blocks != [] and not (isinstance(blocks, str) and not blocks.strip()):
                entry["blocks"] = blocks.strip() if isinstance(blocks, str) else blocks
            out.append(entry)
        return out

    @classmethod
    def canonical(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with each model field as the checkpoint's canonical name (any alias may come in) and each
        LoRA by its name in the LoRA list."""
        out = dict(params)
        if out.get("lora"):
            out["lora"] = cls.canonical_lora(out["lora"])
        elif "lora" in out:
            del out["lora"]  # [] / null: no LoRAs, the same request as without the field

        def name(value: Any, field: str) -> Any:
            body = step_body(value)
            if body is not None:
                return {"recipe": cls.canonical(body)}  # a nested step: its models and LoRAs named alike
            if isinstance(value, str) and value:
                return host.checkpoint_by_name(value, field).name
            return value
        return map_models(out, name)

    def _model(self):
        """The loaded model, loaded now on Forge (lazy until the first generation); refused when this host or
        model cannot do a live merge. Callers hold ``queue_lock``."""
        try:
            model = host.ensure_model_loaded()
        except MergeError as e:
            raise Unsupported(str(e)) from None
        caps = host.capabilities(model)
        if not caps.live:
            raise Unsupported(caps.reason)
        return model

    def _session_for(self, model) -> LiveSession:
        a_path = os.path.realpath(model.sd_checkpoint_info.filename)
        s = self.session
        policy = self._cache_policy(model)  # read at every test merge: a changed setting applies now
        if s is not None and self.model_ref is not None and self.model_ref() is model and s.a.id.path == a_path \
                and s.a.valid():
            s.set_policy(policy)
            return s
        self.drop("new model")
        self.session = LiveSession(host.make_target(model), a_path, cache=policy)
        self.model_ref = weakref.ref(model)
        return self.session

    @staticmethod
    def _cache_policy(model) -> CachePolicy:
        """The cache setting; ``gpu`` means VRAM when there is room (3x A's file free, no --lowvram), else RAM."""
        policy = CachePolicy.parse(host.opt(host.OPT_CACHE_DEVICE, "cpu"), host.OPT_CACHE_DEVICE)
        if policy is not CachePolicy.GPU:
            return policy
        if getattr(model, "lowvram", False) or not torch.cuda.is_available():
            return CachePolicy.CPU
        try:
            free, _ = torch.cuda.mem_get_info()
        except Exception:
            return CachePolicy.CPU
        size = os.path.getsize(model.sd_checkpoint_info.filename)
        return CachePolicy.GPU if free > 3 * size else CachePolicy.CPU

    def drop(self, why: str) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None
        self.model_ref = None
        self.live_params = None
        self.sentinels = {}
        if why:
            self.last_message = why

    def _record_sentinels(self) -> None:
        """One small tensor per written block, to notice a checkpoint load over the merge."""
        s = self.session
        arch = ARCHS.get(s.plan.arch.name) if s.plan else ARCHS["sd1"]
        params = s.target.params()
        best: dict[str, str] = {}
        for k in s.merged_keys():
            b = block_of(k, arch)
            if b not in best or params[k].numel() < params[best[b]].numel():
                best[b] = k
        self.sentinels = {k: params[k].detach().to("cpu", copy=True) for k in best.values()}

    # -- operations -----------------------------------------------------------------------------------------
    def test_merge(self, params: dict[str, Any], keep_base: bool = False) -> dict:
        t0 = time.perf_counter()
        model = self._model()
        field, a_name = first_a(params)  # a chain starts from its first leaf: the loaded checkpoint
        if isinstance(a_name, str) and a_name.strip():
            info = host.checkpoint_by_name(a_name, field)
            if os.path.realpath(info.filename) != os.path.realpath(model.sd_checkpoint_info.filename):
                raise Conflict(f"{field} is not the loaded checkpoint; load it first, {field}: {a_name!r}")
        recipe = to_recipe({k: v for k, v in params.items() if k not in ("output", "overwrite")},
                           self.resolve_model, model.sd_checkpoint_info.filename, resolve_lora=self.lora_resolver())
        t_setup = time.perf_counter()
        session = self._session_for(model)
        t_apply = time.perf_counter()
        self._progress("test merge", 0, 1)
        try:
            with session.target.write_context():
                report = session.apply(recipe, cancel=host.interrupted,
                                       progress=lambda d, t: self._progress("test merge", d, t))
        finally:
            self._progress("idle")
        t_done = time.perf_counter()
        params = self.canonical(params)
        if not keep_base:
            self.base_params = dict(params)
        self.live_params = dict(params) if session.is_merged else None
        self._record_sentinels()
        timings = {"setup": round(t_apply - t_setup, 3), "merge": round(report.seconds, 3),
                   "host_after_write": round(t_done - t_apply - report.seconds, 3),
                   "sentinels": round(time.perf_counter() - t_done, 3)}
        msg = (f"test merge live: {report.written} tensors written, {report.unchanged} unchanged, "
               f"{report.seconds:.2f} s{lora_note(params.get('lora'))}; the preview uses the WebUI's current VAE"
               f"{cache_note(self.status())}")
        self.last_message = msg
        return {"live": session.is_merged, "written": report.written, "unchanged": report.unchanged,
                "seconds": round(time.perf_counter() - t0, 3), "notes": report.notes, "message": msg,
                "timings": timings, "recipe": self.recipe_json()}

    def restore(self) -> dict:
        t0 = time.perf_counter()
        s = self.session
        model = host.loaded_model()
        if s is None or self.model_ref is None or self.model_ref() is not model:
            return {"restored": 0, "seconds": 0.0, "message": "nothing to restore: no test merge is live"}
        with s.target.write_context():
            n = s.restore()
        self.live_params = None
        self.sentinels = {}
        msg = f"original weights restored ({n} tensors){cache_note(self.status())}; Free memory drops them"
        self.last_message = msg
        return {"restored": n, "seconds": round(time.perf_counter() - t0, 3), "message": msg}

    def free(self) -> dict:
        """Drop the cached source tensors the live merge does not need (all of them with nothing merged). A
        session whose model is gone (another checkpoint loaded) is dropped whole."""
        t0 = time.perf_counter()
        s = self.session
        if s is None:
            freed = 0
        elif self.model_ref is not None and self.model_ref() is host.loaded_model():
            with s.target.write_context():
                freed = s.free().bytes_freed
        else:
            freed = s.cache_bytes()
            self.drop("")
        st = self.status()
        msg = f"freed {size_text(freed)}{cache_note(st)}"
        if st["cache_bytes"] and st["live"]:
            msg += " (the live merge's restore source)"
        self.last_message = msg
        return {"freed_bytes": freed, "cache_bytes": st["cache_bytes"], "seconds": round(time.perf_counter() - t0, 3),
                "message": msg}

    def save(self, output: str, overwrite: bool = False, dtype: str | None = None, vae: str | None = None,
             params: dict | None = None) -> dict:
        """Write the live merge (or ``params``) to a file in the models folder and register it."""
        t0 = time.perf_counter()
        source = params if params is not None else self.live_params
        if source is None:
            raise Conflict("no test merge is live: run Test merge first (or use Merge to file)")
        p = {k: v for k, v in source.items() if k not in ("output", "overwrite")}
        if dtype:
            p["dtype"] = dtype
        if vae:
            p["vae"] = vae
        p.setdefault("dtype", host.opt(host.OPT_DEFAULT_DTYPE, DEFAULT_SAVE_DTYPE))
        model = host.loaded_model()
        loaded_path = model.sd_checkpoint_info.filename if model is not None and getattr(model, "sd_checkpoint_info", None) else None
        recipe = to_recipe(p, self.resolve_model, loaded_path, resolve_lora=self.lora_resolver())
        live = self.session.recipe if params is None and self.session is not None else None
        if live is not None:
            recipe = live_seeds(recipe, live)  # random ratios: the numbers that were previewed
        out = output_path(output, host.models_dir())
        leaves = [path for _, path in recipe.leaves()]  # every file of a chain is an input
        protected = [os.path.realpath(m) for m in leaves] + ([os.path.realpath(loaded_path)] if loaded_path else [])
        if os.path.realpath(out) in protected:
            raise MergeError(f"will not overwrite the loaded checkpoint or an input of the merge, output: {out.name}")
        device = "cpu"  # saves of a live merge compute on the live merge's device type (same numbers)
        if params is None and self.session is not None:
            device = next(iter(self.session.target.params().values())).device.type
        self._progress("saving", 0, 1)
        try:
            res = merge_to_file(recipe, out, overwrite=bool(overwrite), device=device, cancel=host.interrupted,
                                progress=lambda stage, d, t: self._progress(stage, d, t))
        finally:
            self._progress("idle")
        for path, n in (res.bytes_read or {}).items():
            self.file_bytes_read[path] = self.file_bytes_read.get(path, 0) + n
        self._copy_config(Path(leaves[0]), out, model)
        self._register(out, res.sha256, model)
        return {"name": out.name, "path": str(out), "sha256": res.sha256, "short_hash": res.short_hash,
                "seconds": round(time.perf_counter() - t0, 3), "recipe": json.loads(res.metadata["blockmerge_recipe"])}

    @staticmethod
    def _copy_config(a_path: Path, out: Path, model) -> None:
        yaml = a_path.with_suffix(".yaml")
        target = out.with_suffix(".yaml")
        if yaml.exists():
            shutil.copyfile(yaml, target)
        elif model is not None and getattr(model, "is_sd2", False) and getattr(model, "used_config", None):
            if os.path.exists(model.used_config):
                shutil.copyfile(model.used_config, target)

    @staticmethod
    def _register(out: Path, sha256: str, model) -> None:
        host.refresh_checkpoints()
        sdm = host._m("sd_models")
        info = next((i for i in sdm.checkpoints_list.values() if os.path.realpath(i.filename) == os.path.realpath(out)), None)
        if info is not None:
            host.seed_hash_cache(out, info.name, sha256)
            try:
                info.calculate_shorthash()
            except Exception:
                pass
        if model is not None and getattr(model, "sd_checkpoint_info", None) is not None:
            loaded = os.path.realpath(model.sd_checkpoint_info.filename)
            cur = next((i for i in sdm.checkpoints_list.values() if os.path.realpath(i.filename) == loaded), None)
            if cur is not None:  # as the host's checkpoint dropdown lists it (Forge: names, no hash)
                host.opts().data["sd_model_checkpoint"] = cur.name if host.is_forge() else cur.title

    def merge_file(self, params: dict) -> dict:
        """``POST merge``: a file merge of any models (A defaults to nothing: it is required)."""
        p = dict(params)
        output = p.pop("output", None)
        overwrite = flag(p, "overwrite")
        p.pop("overwrite", None)
        need_model_a(p)
        p.setdefault("vae", "merge")
        return self.save(output, overwrite, params=p)

    # -- LoRA files (issue 13): the tab's buttons and the API routes both land here --------------------------
    def lora_extract(self, body: dict) -> dict:
        """``POST lora/extract``: a LoRA from two checkpoints into the LoRA folder (see ``lora.extract``)."""
        from . import lora  # imports this module's Conflict
        return self._lora_job(lora.extract, body, "extracted")

    def lora_merge(self, body: dict) -> dict:
        """``POST lora/merge``: LoRAs of the LoRA folder into one (see ``lora.merge``)."""
        from . import lora
        return self._lora_job(lora.merge, body, "merged LoRAs into")

    def _lora_job(self, job, body: dict, verb: str) -> dict:
        try:
            res = job(body, progress=lambda stage: self._progress(stage))
        finally:
            self._progress("idle")
        self.last_message = f"{verb} {res['output']} in the LoRA folder"
        return res

    # -- state ----------------------------------------------------------------------------------------------
    def recipe_json(self) -> dict | None:
        s = self.session
        if s is None or s.recipe is None or not s.is_merged:
            return None
        return s.recipe.to_dict()

    def infotext_fields(self) -> dict[str, str]:
        """Fields for generation infotexts while merged weights are live: the recipe with the models' file names,
        never their paths (infotexts travel inside shared images), and a short hash of it."""
        recipe = self.recipe_json()
        if recipe is None or not self.status()["live"]:
            return {}
        public(recipe, self._lora_names() if _has_lora(recipe) else {})
        text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
        return {"BlockMerge": text, "BlockMerge hash": hashlib.sha256(text.encode()).hexdigest()[:10]}

    @staticmethod
    def _lora_names() -> dict[str, str]:
        """real path -> name in the LoRA list (infotexts name LoRAs as ``lora`` requests do, never by path)."""
        from . import lora
        try:
            return {os.path.realpath(p): n for n, p in lora.lora_files().items()}
        except Exception:
            return {}

    def status(self) -> dict:
        """Runs beside a test merge without a lock (``GET status``): reads the session's snapshot only."""
        model = host.loaded_model()
        s, ref = self.session, self.model_ref
        snap = s.snapshot() if s is not None else None
        live = bool(snap is not None and ref is not None and ref() is model and snap.merged)
        reads = dict(self.file_bytes_read)
        for path, n in (snap.bytes_read if snap else {}).items():
            reads[path] = reads.get(path, 0) + n
        info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
        caps = host.capabilities(model) if model is not None else None
        return {
            "loaded": getattr(info, "title", None),
            "host": "forge" if host.is_forge() else "a1111",
            "selected": None if info is not None or not host.is_forge() else host.selected_checkpoint(),
            "live": live,
            "merged_tensors": snap.merged_tensors if snap else 0,
            "params": self.live_params if live else None,
            "progress": dict(self.progress),
            "bytes_read": reads,
            "cache_device": snap.policy.value if snap else None,
            "cache_bytes": snap.cache_bytes if snap else 0,  # RAM / VRAM the caches hold
            "cache_pending_bytes": snap.cache_pending if snap else 0,  # still being copied into RAM
            "message": self.last_message,
            "unsupported": caps.reason if caps is not None else None,
        }

    def fingerprint(self) -> dict:
        """sha256 over the loaded model's UNet + text-encoder parameters by file key (LoRA folded back), and the
        file keys it covers (on Forge, what Forge loads of the file: it drops keys its text encoders lack)."""
        from ..live import fingerprint
        model = self._model()
        target = host.make_target(model)
        with target.write_context():
            target.prepare(list(target.params()))
        params = target.params()
        return {"fingerprint": fingerprint(params), "tensors": len(params), "keys": sorted(params),
                "loaded": model.sd_checkpoint_info.title, "live": self.status()["live"]}

    def _intact(self, model) -> bool:
        """Our merged weights are still in ``model`` (same object, same file A, sentinel tensors unchanged)."""
        s = self.session
        if s is None or self.model_ref is None or self.model_ref() is not model:
            return False
        info = getattr(model, "sd_checkpoint_info", None)
        if info is None or os.path.realpath(info.filename) != s.a.id.path:
            return False
        try:
            params = s.target.params()
            return all(torch.equal(params[k].detach().to("cpu"), want) for k, want in self.sentinels.items())
        except Exception:
            return False

    def on_model_loaded(self, model) -> None:
        """A checkpoint (or VAE) was loaded: keep the live state only if our weights are still there."""
        if self.session is not None and not self._intact(model):
            self.drop("merge discarded by checkpoint load" if self.live_params else "")

    def begin_generation(self) -> dict[str, str]:
        """A generation starts (AlwaysOn ``process``): remember what must be live for it; its infotext fields."""
        fields = self.infotext_fields()
        self.generation_params = None
        if fields and self.live_params is not None:
            info = host.loaded_model().sd_checkpoint_info  # pinned: a re-apply must never merge another A
            self.generation_params = pin_first_a(self.live_params, info.name)  # a chain's first leaf
        return fields

    def ensure_applied(self, p) -> None:
        """Before each batch: if a reload wiped the merge this generation was started with, apply it again; if
        that fails, stop the generation and take the recipe out of its infotext (never a false label)."""
        want = self.generation_params
        model = host.loaded_model()
        if want is None or (self.status()["live"] and self._intact(model)):
            return
        try:
            self.test_merge(want, keep_base=True)
            self.last_message = "merge re-applied after a checkpoint reload"
        except Exception as e:
            self.generation_params = None
            extra = getattr(p, "extra_generation_params", None) or {}
            for k in ("BlockMerge", "BlockMerge hash"):
                extra.pop(k, None)
            self.last_message = f"merge lost by a checkpoint reload and not re-applied: {e}"
            host.state().interrupt()

    # -- merge chains (the tab's "Merge again from the preview") -----------------------------------------------
    def chain_from_live(self) -> dict:
        """The live merge becomes model A of the tab's next Test merge (and Merge to file): its settings, A
        pinned to the loaded checkpoint, the seed it drew (random ratios re-run as previewed)."""
        if not self.status()["live"] or self.live_params is None:
            raise Conflict("no test merge is live: run Test merge first, then merge again from its preview")
        step = pin_first_a(self.live_params, host.loaded_model().sd_checkpoint_info.name)
        seed = (self.recipe_json() or {}).get("seed")
        if step.get("seed") is None and seed is not None:
            step["seed"] = seed
        step.pop("dtype", None)  # a step's result stays in A's dtype as the preview held it, not the save dtype
        self.chain_base = step
        self.last_message = f"next merges start from {self.chain_text()}"
        return self.chain_base

    def clear_chain(self) -> None:
        self.chain_base = None

    def chain_text(self) -> str:
        """``(synthA × synthB, GRAD_V)``: the chain base in a few words ("" when there is none)."""
        if self.chain_base is None:
            return ""
        model = host.loaded_model()
        info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
        arch = ARCHS["sdxl" if getattr(model, "is_sdxl", False) else "sd1"]
        return describe(self.chain_base, getattr(info, "name", None), lambda text: preset_named(text, arch))

    def chained(self, params: dict) -> dict:
        """A tab request with the chain base as its model A (unchanged when there is no chain)."""
        if self.chain_base is None:
            return params
        return {**params, "model_a": {"recipe": dict(self.chain_base)}}


def preset_named(weights: str, arch) -> str | None:
    """The preset whose vector ``weights`` is (the tab sends a chosen preset as its values), else None."""
    try:
        vec = parse_weights(weights, arch, 0.5)
    except MergeError:
        return None
    for name in presets.names(arch):
        want = presets.resolve(name, arch)
        if len(want) == len(vec) and all(abs(x - y) <= 1e-9 for x, y in zip(vec, want)):
            return name
    return None


def need_model_a(params: dict, path: str = "") -> None:
    """A file merge names model A in every step (no loaded checkpoint stands in for it)."""
    if not params.get("model_a"):
        raise MergeError(f"model_a is required for a file merge, {path}model_a")
    for field, value in model_slots(params):
        body = step_body(value)
        if body is not None:
            need_model_a(body, f"{path}{field}.recipe.")


def live_seeds(recipe: Recipe, live: Recipe) -> Recipe:
    """``recipe`` with the seeds the live merge drew where it gives none, in every step of a chain."""
    models = [live_seeds(m, lm) if isinstance(m, Recipe) and isinstance(lm, Recipe) else m
              for m, lm in zip(recipe.models, live.models)] + list(recipe.models[len(live.models):])
    seed = live.seed if recipe.seed is None else recipe.seed
    return replace(recipe, models=models, seed=seed)


def _has_lora(recipe: dict) -> bool:
    return bool(recipe.get("lora")) or any(isinstance(m, dict) and _has_lora(m["recipe"])
                                           for m in recipe.get("models") or [])


def public(recipe: dict, lora_names: dict[str, str]) -> dict:
    """A recipe's JSON form (``Recipe.to_dict``) for infotexts, in place: file names, never paths (infotexts
    travel inside shared images), LoRAs by their name in the LoRA list; nested steps alike."""
    recipe["models"] = [{"recipe": public(m["recipe"], lora_names)} if isinstance(m, dict) else os.path.basename(m)
                        for m in recipe.get("models") or []]
    if recipe.get("bake_vae"):
        recipe["bake_vae"] = os.path.basename(recipe["bake_vae"])
    for e in recipe.get("lora") or []:
        e["path"] = lora_names.get(os.path.realpath(e["path"]), os.path.basename(e["path"]))
    return recipe


SERVICE = Service()
