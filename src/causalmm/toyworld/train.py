"""Train the toy world's tiny LLaVA on its generated stream, on CPU, reproducibly.

Each step draws ``batch_size`` fresh samples (:func:`~causalmm.toyworld.stream.train_sample`; the world is
endless, so nothing repeats and nothing is shipped) and minimises cross-entropy on the answer tokens only
(and the ``</s>`` that closes each answer); prompts and image tokens carry no loss. AdamW with linear warm-up
and cosine decay. Stage 1 first teaches the vision tower what each patch and the whole image hold; stage 2
keeps it frozen (as LLaVA keeps CLIP) while the projector and LLM learn. The same ``seed``, world, size, step
count and thread count give the same weights (one machine: float reductions depend on the CPU's kernels).

Output: a ``from_pretrained`` directory (safetensors weights, processor, tokenizer, generation config) plus
``training.json``: the configs, the loss and answer accuracy per logged step, the wall time.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from ..loading import save_quietly
from .model import ModelSize, build_config, build_processor, build_tokenizer, describe, generation_config, image_tokens
from .render import render
from .scenes import sample_scene
from .stream import TrainSample, train_sample
from .world import WorldConfig

__all__ = ["TrainConfig", "Batch", "collate", "train"]

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``seed`` seeds the initialisation and picks the stretch of the stream used."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 2
    log_every: int = 25
    #: samples are drawn ``bucket`` batches at a time and grouped by length (less padding, same data)
    bucket: int = 8
    #: stage 1: steps of vision-tower pre-training on per-patch object/colour labels (0 = none)
    vision_steps: int = 250
    vision_batch_size: int = 64
    vision_lr: float = 1e-3
    #: stage 1 also asks every patch which objects are anywhere in the image: the tower must gather context
    #: through attention (as a real CLIP does), so counterfactual attention in it has something to break
    vision_context: bool = True
    #: stage 1 labels each patch with the objects it shows; False: objects only at the image level (as CLIP
    #: learns objects from captions), so a feature that predicts an object anywhere in the image (a cue) can stand
    #: in for the object itself: the vision-prior world's setting
    patch_objects: bool = True
    #: stage 2 learning rate of the vision tower relative to ``lr``; 0 freezes it (LLaVA keeps CLIP frozen).
    #: Adam moves every weight by about ``lr`` per step whatever the gradient's size, so at the LM's rate the
    #: noisy early gradients of a random LM would scramble what stage 1 taught the tower.
    tower_lr_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.threads < 1 or self.bucket < 1:
            raise ValueError("steps, batch_size, threads and bucket must be at least 1")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError("lr must be > 0 and warmup >= 0")
        if not (self.patch_objects or self.vision_context):
            raise ValueError("stage 1 needs patch_objects or vision_context: otherwise no object is taught")
        if not 0 <= self.tower_lr_scale <= 1:
            raise ValueError(f"tower_lr_scale must be in [0, 1], got {self.tower_lr_scale}")


@dataclass
class Batch:
    """Right-padded token ids, their mask, the loss labels (``-100`` where no loss), pixel values, and which
    turn kind each labelled answer belongs to (for accuracy by kind)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    answer_kinds: list[tuple[int, int, int, str]]  # (row, answer start, end (its </s>), turn kind)


class _Encoder:
    """Turns training samples into token ids exactly as the processor + chat template would (tested)."""

    def __init__(self, world: WorldConfig, size: ModelSize, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.n_image = image_tokens(world, size)

    @functools.lru_cache(maxsize=8192)  # noqa: B019  (prompts repeat a lot; the encoder lives for one run)
    def words(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode(self, sample: TrainSample) -> tuple[list[int], list[int], list[tuple[int, int, str]]]:
        ids = [self.tokenizer.bos_token_id]
        labels = [IGNORE]
        starts: list[tuple[int, int, str]] = []
        eos = self.tokenizer.eos_token_id
        for k, turn in enumerate(sample.turns):
            prompt = f"USER: <image>\n{turn.prompt} ASSISTANT:" if k == 0 else f"USER: {turn.prompt} ASSISTANT:"
            p = []
            for t in self.words(prompt):
                p.extend([self.image_id] * self.n_image if t == self.image_id else [t])
            a = [*self.words(turn.answer), eos]
            ids += p
            labels += [IGNORE] * len(p)
            starts.append((len(ids), len(ids) + len(a) - 1, turn.kind))
            ids += a
            labels += a
        return ids, labels, starts


def collate(encoder: _Encoder, samples: list[TrainSample], encoded: list[tuple] | None = None) -> Batch:
    """Pad ``samples`` into a batch (``encoded``: their :meth:`_Encoder.encode` outputs, if already made)."""
    encoded = encoded if encoded is not None else [encoder.encode(s) for s in samples]
    width = max(len(ids) for ids, _, _ in encoded)
    pad = encoder.tokenizer.pad_token_id
    input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    kinds = []
    for row, (ids, lab, starts) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
        kinds += [(row, a, b, kind) for a, b, kind in starts]
    pixels = encoder.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    return Batch(input_ids, mask, labels, pixels, kinds)


def _batches(world: WorldConfig, encoder: _Encoder, cfg: TrainConfig) -> Iterator[Batch]:
    """Training batches: each chunk of ``bucket * batch_size`` consecutive samples of this seed's stretch of the
    stream is sorted by length, cut into ``bucket`` batches, and those are yielded in a seeded random order."""
    first = cfg.seed * 10_000_000  # each training seed reads its own stretch of the endless stream
    chunk = cfg.batch_size * cfg.bucket
    for c in itertools.count():
        samples = [train_sample(world, first + c * chunk + i) for i in range(chunk)]
        encoded = [encoder.encode(s) for s in samples]
        order = sorted(range(chunk), key=lambda i: (len(encoded[i][0]), i))
        groups = [order[k * cfg.batch_size : (k + 1) * cfg.batch_size] for k in range(cfg.bucket)]
        for k in np.random.default_rng([cfg.seed, c]).permutation(cfg.bucket):
            yield collate(encoder, [samples[i] for i in groups[k]], [encoded[i] for i in groups[k]])


def patch_targets(world: WorldConfig, size: ModelSize, scenes: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch (row-major, as CLIP flattens its grid): multi-hot of the objects and of the colours whose glyph
    box overlaps the patch; shapes (batch, patches, objects) and (batch, patches, colours)."""
    grid = world.image_size // size.patch
    objects = torch.zeros(len(scenes), grid * grid, len(world.objects))
    colours = torch.zeros(len(scenes), grid * grid, len(world.colours))
    for b, scene in enumerate(scenes):
        for it in scene.items:
            first_r, last_r = it.y // size.patch, (it.y + it.h - 1) // size.patch
            first_c, last_c = it.x // size.patch, (it.x + it.size - 1) // size.patch
            for r in range(first_r, last_r + 1):
                for c in range(first_c, last_c + 1):
                    objects[b, r * grid + c, world.objects.index(it.name)] = 1
                    colours[b, r * grid + c, world.colours.index(it.colour)] = 1
    return objects, colours


def _pretrain_vision(
    model: Any, processor: Any, world: WorldConfig, size: ModelSize, cfg: TrainConfig
) -> list[dict[str, Any]]:
    """Stage 1, as LLaVA starts from a pre-trained CLIP: teach the vision tower what is in each patch (a linear
    head on the features the LLM reads, discarded afterwards). Returns the logged records."""
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    with torch.random.fork_rng(devices=[]):  # seeded like the model, whatever the global RNG holds
        torch.manual_seed(cfg.seed + 1)
        n_heads = int(cfg.patch_objects) + int(cfg.vision_context)
        head = torch.nn.Linear(hidden, n_heads * len(world.objects) + len(world.colours))
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    warm = max(1, cfg.vision_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    first = cfg.seed * 10_000_000 + 5_000_000  # a stretch of the stream stage 2 does not use
    history = []
    n_obj = len(world.objects)
    for step in range(cfg.vision_steps):
        base = first + step * cfg.vision_batch_size
        scenes = [sample_scene(world, "train", base + i, tower=True) for i in range(cfg.vision_batch_size)]
        pixels = processor.image_processor([render(world, s) for s in scenes], return_tensors="pt")["pixel_values"]
        objects, colours = patch_targets(world, size, scenes)
        context = objects.amax(1, keepdim=True).expand_as(objects)
        targets = [objects, colours] if cfg.patch_objects else [colours]
        if cfg.vision_context:
            targets.append(context)
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = head(feats)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.cat(targets, -1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vision_steps:
            record = {"vision_step": step + 1, "loss": round(float(loss.detach()), 5)}
            if cfg.patch_objects:
                pred = logits.detach()[..., :n_obj] > 0
                record["patch_exact"] = float((pred == objects.bool()).all(-1).float().mean())
            if cfg.vision_context:
                ctx = logits.detach()[..., -n_obj:] > 0
                record["image_exact"] = float((ctx == context.bool()).all(-1).float().mean())
            history.append(record)
    return history


def _param_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on embeddings, norms and biases; the vision tower at ``tower_lr_scale``
    times the rate, or frozen."""
    tower = model.model.vision_tower
    if cfg.tower_lr_scale == 0:
        tower.requires_grad_(False)
    tower_ids = {id(p) for p in tower.parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (id(p) in tower_ids, p.dim() >= 2 and "embed" not in name)
            groups.setdefault(key, []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.lr * (cfg.tower_lr_scale if in_tower else 1.0),
            "weight_decay": cfg.weight_decay if decays else 0.0,
        }
        for (in_tower, decays), params in sorted(groups.items())
    ]


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _step_metrics(logits: torch.Tensor, batch: Batch) -> dict[str, tuple[int, int]]:
    """Per turn kind: (answer tokens predicted right, answer tokens), the closing </s> not counted."""
    pred = logits.argmax(-1)
    out: dict[str, list[int]] = {}
    for row, a, b, kind in batch.answer_kinds:
        hits = int((pred[row, a - 1 : b - 1] == batch.input_ids[row, a:b]).sum())
        acc = out.setdefault(kind, [0, 0])
        acc[0] += hits
        acc[1] += b - a
    return {k: (v[0], v[1]) for k, v in out.items()}


def train(
    out_dir: str | Path,
    *,
    world: WorldConfig | None = None,
    size: ModelSize | None = None,
    cfg: TrainConfig | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train a toy-world model and save it under ``out_dir`` (a ``from_pretrained`` directory); its path.

    ``on_log`` gets each logged record (step, loss, lr, accuracy by turn kind, elapsed seconds), e.g. for a
    progress bar.
    """
    world = world or WorldConfig()
    size = size or ModelSize()
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        tokenizer = build_tokenizer(world)
        processor = build_processor(world, size, tokenizer)
        encoder = _Encoder(world, size, processor)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = LlavaForConditionalGeneration(build_config(world, size, tokenizer))
        model.config._attn_implementation = "sdpa"
        model.train()
        start = time.perf_counter()
        vision_history = _pretrain_vision(model, processor, world, size, cfg) if cfg.vision_steps else []
        if on_log is not None and vision_history:
            on_log(vision_history[-1])
        opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
        batches = _batches(world, encoder, cfg)
        history: list[dict[str, Any]] = []
        window_loss, window_n, window_acc = 0.0, 0, {}
        for step in range(cfg.steps):
            batch = next(batches)
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
            ).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            window_loss += float(loss.detach())
            window_n += 1
            for kind, (hit, n) in _step_metrics(logits.detach(), batch).items():
                acc = window_acc.setdefault(kind, [0, 0])
                acc[0] += hit
                acc[1] += n
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                record = {
                    "step": step + 1,
                    "loss": round(window_loss / window_n, 5),
                    "lr": round(sched.get_last_lr()[0], 7),
                    "accuracy": {k: round(h / n, 4) for k, (h, n) in sorted(window_acc.items())},
                    "elapsed_s": round(time.perf_counter() - start, 1),
                }
                history.append(record)
                if on_log is not None:
                    on_log(record)
                window_loss, window_n, window_acc = 0.0, 0, {}
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = generation_config(tokenizer)
    save_quietly(model, processor, out)
    record = {
        "format": "causalmm-toyworld-training/1",
        "world": asdict(world),
        "size": size.to_dict(),
        "train": asdict(cfg),
        "model": describe(model),
        "samples_seen": cfg.steps * cfg.batch_size,
        "wall_time_s": round(elapsed, 1),
        "torch": torch.__version__,
        "vision_history": vision_history,
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out
