"""Per sampling run state, owned by an OUTER_SAMPLE wrapper and dropped when the run ends, however it ends."""

from __future__ import annotations

from collections.abc import Callable

import comfy.patcher_extension as pe
import torch

from . import options


class RunCache:
    """Per sampling run: one-way reference K/V by entry, the positive prompt (the reference pass and
    ERAE auto maps read it), the latest positive ERAE maps with their (x, timestep), and the sampled
    model's ``percent_to_sigma`` (TAB progress by noise level). Not a dict, so the host's per-call
    copies of transformer_options share it."""

    def __init__(self, text: torch.Tensor | None = None,
                 percent_to_sigma: Callable[[float], float] | None = None) -> None:
        self.kv: dict = {}
        self.text = text
        self.percent_to_sigma = percent_to_sigma
        self.maps: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None = None

    def positive(self, context: torch.Tensor) -> torch.Tensor | None:
        """The positive prompt ``[1, L, D]`` on ``context``'s device and dtype, or None if it has no
        prompt of ``context``'s shape."""
        if self.text is None or self.text.shape[1:] != context.shape[1:]:
            return None
        self.text = self.text.to(context.device, context.dtype)
        return self.text[:1]

    def store_maps(self, x: torch.Tensor, timestep: torch.Tensor, maps: dict[int, torch.Tensor]) -> None:
        # One record: a step's cond and uncond calls come one after the other.
        self.maps = (x.clone(), timestep.clone(), maps)

    def maps_for(self, x: torch.Tensor, timestep: torch.Tensor) -> dict[int, torch.Tensor] | None:
        if self.maps is None:
            return None
        mx, mt, maps = self.maps
        same = mx.shape == x.shape and mt.shape == timestep.shape and torch.equal(mt, timestep) \
            and torch.equal(mx, x)
        return maps if same else None


def stream_text(transformer_options: dict, context: torch.Tensor, cond_row: int) -> torch.Tensor:
    """The text a one-way reference pass reads: the run's positive prompt, whichever rows this call holds (the
    host may run cond and uncond in one batch or apart); outside a sampler, the call's cond row."""
    cache = options.run_cache(transformer_options)
    text = cache.positive(context) if cache is not None else None
    return context[cond_row:cond_row + 1] if text is None else text


def cached_stream(transformer_options: dict, key: tuple, text: torch.Tensor, when: tuple | None,
                  compute: Callable[[], object]):
    """A one-way reference pass's per-block K/V: the run's cached one for ``key`` if it was computed from the
    same ``text`` at the same ``when`` (None: any step, i.e. clean), else ``compute()`` (kept for the run)."""
    cache = options.run_cache(transformer_options)
    run = cache.kv if cache is not None else None
    hit = run.get(key) if run is not None else None
    # The sampler rebuilds the conditioning batch every step: compare the text by value.
    if hit is not None and hit[1] == when and hit[0].shape == text.shape and torch.equal(hit[0], text):
        return hit[2]
    kv = compute()
    if run is not None:
        run[key] = (text.clone(), when, kv)
    return kv


def positive_text(guider) -> torch.Tensor | None:
    positive = (getattr(guider, "conds", None) or {}).get("positive") or []
    text = positive[0].get("cross_attn") if positive else None
    # A copy: run state must not alias the user's conditioning (it is dropped with the run).
    return text[:1].clone() if isinstance(text, torch.Tensor) else None


def outer_sample_wrapper(executor, *args, **kwargs):
    """Owns the per-run cache; it is dropped when sampling ends, however it ends."""
    guider = executor.class_obj
    opts = guider.model_options.setdefault("transformer_options", {})
    # The guider's model is the one sampled: its model_sampling includes any sampling node after Apply.
    patcher = getattr(guider, "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    opts[options.RUN_KEY] = RunCache(positive_text(guider), getattr(sampling, "percent_to_sigma", None))
    try:
        return executor(*args, **kwargs)
    finally:
        opts.pop(options.RUN_KEY, None)


def estimate_with_extra_frames(executor, model, noise_shape, extra: int, *args, **kwargs):
    """A PREPARE_SAMPLING wrapper's body: the host's memory estimate for ``extra`` more latent frames (the
    pack's reference frames), so the host frees and offloads for what the patched model will really use."""
    if extra and len(noise_shape) == 5:
        noise_shape = torch.Size([*noise_shape[:2], noise_shape[2] + extra, *noise_shape[3:]])
    return executor(model, noise_shape, *args, **kwargs)


def install_run_cache(model) -> None:
    """Give ``model`` (a clone) the OUTER_SAMPLE wrapper that owns the run cache (once)."""
    if not model.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, options.WRAPPER_KEY):
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, options.WRAPPER_KEY, outer_sample_wrapper)
