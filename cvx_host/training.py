"""Adapter training on the host: the host's ModelPatcher with the pack's reference patch (two-way reference
attention: CogVideoX's inserted tokens, or Wan's inserted leading frame) and the adapter's block patch, under the
host's model management (device, dtype); the VAE and text encoder are the host's. The maths is
:mod:`cvx_core.training`; what differs per backbone family is how a call carries the reference
(:data:`REFERENCE_CALLS`) and the model's objective (from its host model sampling)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import comfy.model_management as mm
import comfy.model_sampling
import torch

from ..cvx_core.dataset import EncodeText, EncodeVideo, PrepSettings, prepare_dataset
from ..cvx_core.lora import ReferenceLora, block_target_shapes, init_adapter
from ..cvx_core.training import ModelFn, Objective, TrainingError, TrainResult, TrainSettings, train_adapter
from . import options
from .adapters import adapter_family, apply_reference_adapter, module_shapes
from .cogvideox import CogVideoX
from .entries import ReferenceEntry
from .frames_patch import FramesEntry
from .reference_patch import install
from .wan_insert import apply_inserted_reference

NODE = "CustomVideoXTrainAdapter"
# (patched model, reference_timestep) -> (the model to train on, reference [1,C,1,h,w] -> the call's options)
ReferenceCall = Callable[[object, str], tuple[object, Callable[[torch.Tensor], dict]]]


def _cogvideox_reference(patched, reference_timestep: str):
    p_t = CogVideoX.for_model(patched, NODE).patch_t
    install(patched)  # the reference machinery (wrapper, attention override, RoPE); each call sets its entry

    def call(reference: torch.Tensor) -> dict:
        return {options.ENTRIES_KEY: [ReferenceEntry(latent=reference.repeat(1, 1, p_t, 1, 1),
                                                     reference_timestep=reference_timestep)]}

    return patched, call


def _wan_reference(patched, reference_timestep: str):
    if reference_timestep != "sampling":
        raise TrainingError(f"{NODE} reference_timestep: {reference_timestep!r} on a Wan model: the inserted "
                            f"reference takes the video's timestep there; use 'sampling'")
    # CustomVideoXApply's patch at strength 1 (the reference frame in front of the video, unbiased); the frame
    # itself changes per step, so each call's options carry it.
    placeholder = torch.zeros(1, 1, 1, 1, 1)
    patched = apply_inserted_reference(patched, placeholder, FramesEntry(), NODE)

    def call(reference: torch.Tensor) -> dict:
        return {options.INSERTED_FRAMES_KEY: [reference]}

    return patched, call


REFERENCE_CALLS: dict[str, ReferenceCall] = {"CogVideoX": _cogvideox_reference, "Wan": _wan_reference}


def objective_of(model) -> Objective:
    """The host model sampling's objective and sigma table (v-prediction for CogVideoX, flow for Wan)."""
    ms = model.get_model_object("model_sampling")
    kind = "flow" if isinstance(ms, comfy.model_sampling.CONST) else "v_prediction"
    return Objective(kind, ms.sigmas.detach().float().cpu())


def training_model_fn(model, lora: ReferenceLora, reference_timestep: str = "sampling"
                      ) -> tuple[ModelFn, torch.device, torch.dtype, Objective]:
    """``(model_fn, device, dtype, objective)`` for :func:`cvx_core.training.train_adapter`.

    The reference goes through the same patch as at inference, with CustomVideoXApply's
    ``reference_timestep`` (two-way): the call carries its sigma, so ``noised`` noises the reference
    exactly as a sampler's call would. The DiT gets the timestep the host's model sampling gives the
    sigma (CogVideoX: the index itself; Wan: ``1000 * sigma``), as the host's own model call does.

    ``model`` must hold ordinary (not inference-mode) weights: inside a node, pass a
    ``clone(force_deepcopy=True)`` made under ``torch.inference_mode(False)``.
    """
    family = adapter_family(model, NODE)
    patched, reference_options = REFERENCE_CALLS[family.scheme.family](apply_reference_adapter(model, lora, 1.0),
                                                                       reference_timestep)
    mm.load_models_gpu([patched], memory_required=1e20, force_full_load=True)
    device = patched.load_device
    dtype = patched.model.manual_cast_dtype or patched.model.get_dtype()
    ms = patched.get_model_object("model_sampling")
    sigmas = ms.sigmas
    base_opts = dict(patched.model_options.get("transformer_options", {}))
    base_opts["wrappers"] = patched.wrappers
    diffusion_model = patched.model.diffusion_model

    def model_fn(x_t, t, text, reference, checkpointing):
        opts = dict(base_opts)
        opts.update(reference_options(reference))
        sigma = sigmas[t.long().cpu()].to(t.device)
        opts["sigmas"] = sigma
        opts[options.CHECKPOINT_KEY] = checkpointing
        return diffusion_model(x_t, ms.timestep(sigma).float().to(t.device), text, transformer_options=opts)

    return model_fn, device, dtype, objective_of(patched)


def host_encoders(model, vae, clip) -> tuple[EncodeVideo, EncodeText]:
    """Dataset encoders from the host's VAE and text encoder, in the model's latent space."""
    latent_format = model.get_model_object("latent_format")

    def encode_video(frames: torch.Tensor) -> torch.Tensor:
        return latent_format.process_in(vae.encode(frames).float())

    def encode_text(caption: str) -> torch.Tensor:
        return clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0][0]

    return encode_video, encode_text


def train_on_host(model, encode_video: EncodeVideo, encode_text: EncodeText, dataset_folder: str | Path,
                  out_dir: str | Path, settings: TrainSettings, prep: PrepSettings, subject: str = "",
                  base_model: str = "", adapter_name: str = "customvideox_adapter", encoder_id: str = "",
                  resume: bool = True, progress=None, prep_progress=None) -> TrainResult:
    """Prepare (or reuse) the cached dataset and train an adapter on ``model``; see train_adapter.
    ``prep_progress(done, total, clip)`` follows the dataset preparation."""
    out_dir = Path(out_dir)
    data = prepare_dataset(dataset_folder, out_dir / "cache", encode_video, encode_text, prep, subject=subject,
                           encoder_id=encoder_id, progress=prep_progress)
    shapes = block_target_shapes(module_shapes(model), tuple(settings.targets),
                                 adapter_family(model, NODE).target_modules)
    lora = init_adapter(shapes, settings.rank, settings.alpha, seed=settings.seed)
    model_fn, device, dtype, objective = training_model_fn(model, lora, settings.reference_timestep)
    mm.in_training = True  # as the host's own trainer: ops then keep autograd-friendly paths
    try:
        return train_adapter(settings, data, model_fn, lora, objective, out_dir, device=device, dtype=dtype,
                             base_model=base_model, adapter_name=adapter_name, resume=resume, progress=progress,
                             check_interrupt=mm.throw_exception_if_processing_interrupted)
    finally:
        mm.in_training = False


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap stable id for a model's weights (names, shapes and a few values), for the dataset cache key."""
    import hashlib

    h = hashlib.sha256()
    for name, p in list(module.state_dict().items())[:64]:
        h.update(f"{name}:{tuple(p.shape)}:{p.flatten()[:8].float().tolist()}".encode())
    return h.hexdigest()[:16]

