"""The lmms-eval model class: ``lmms-eval --model causalmm --model_args pretrained=...,method=causalmm,...``.

A simple (``is_simple``) lmms-eval model: requests carry the task's text and a function that gives the doc's
images. Each request is answered by :meth:`causalmm.CausalMM.generate`, batched by task, split and generation
options, with the seeds ``causalmm eval`` gives the same question (:mod:`.requests`), so the two agree answer for
answer on the same data. Several processes (``accelerate launch -m lmms_eval ...``) each take a rank from
accelerate, as lmms-eval's built-in models do (on CPU, where accelerate sees one process, from the launcher's
``RANK``/``WORLD_SIZE``); lmms-eval deals the docs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ..api import CausalMM
from ..config import CausalMMConfig
from ..inputs import user_errors
from ..seeds import image_seed, sample_seed
from .args import ModelArgs, ModelArgsError, generation_options, merge_command_line, parse_model_args
from .requests import ImageDigests, SampleIds

__all__ = ["CausalMMLmms", "UnsupportedRequestError"]

#: lmms-eval tasks (0.7) that score given continuations instead of generating: ``loglikelihood`` requests
LOGLIKELIHOOD_TASKS = (
    "the loglikelihood / multiple_choice tasks (seedbench_ppl, egoschema_mcppl, perceptiontest_mcppl, "
    "worldqa_mcppl, worldvqa_mcppl, arc_easy, hellaswag)"
)


class UnsupportedRequestError(ValueError):
    """A request the plugin cannot answer (several images, video, audio, beams); the message says which."""


def _under_lmms_command() -> bool:
    """Whether lmms-eval's command line (``lmms-eval``, ``python -m lmms_eval``, ``accelerate launch -m
    lmms_eval``) is what runs us: its ``cli_evaluate`` is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "cli_evaluate" and Path(code.co_filename).parts[-2:] == ("lmms_eval", "__main__.py"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _failing_the_command() -> Iterator[None]:
    """Under lmms-eval's command line an error ends the run with a non-zero exit code: a user's mistake (a bad
    ``model_args`` key or value, a refused request or input) as one ``error:`` line and exit code 2, like
    ``causalmm``'s own commands; any other error with its traceback and exit code 1.

    lmms-eval's ``cli_evaluate`` catches every exception, prints its traceback and exits 0 (unless run with
    ``--verbosity DEBUG``), so a refused run looked like a finished one to scripts and CI; ``SystemExit`` passes its
    ``except Exception``. Called from Python (``simple_evaluate``, the class itself) errors are raised as they are.
    """
    try:
        yield
    except Exception as err:
        if not _under_lmms_command():
            raise
        if isinstance(err, (ModelArgsError, UnsupportedRequestError, *user_errors())):
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        traceback.print_exc()
        raise SystemExit(1) from None


class CausalMMLmms(lmms):
    """CausalMM (or any method of ``causalmm.methods``) as an lmms-eval model; ``model_args`` as in
    :mod:`causalmm.lmms.args`."""

    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        settings: ModelArgs = parse_model_args(kwargs)
        from accelerate import Accelerator

        accelerator = Accelerator()
        load = dict(settings.load)
        device = load.pop("device", None)
        device_map = load.pop("device_map", None)
        if accelerator.num_processes > 1 and device_map is None:
            # one replica per process, on the process's own GPU (lmms-eval's built-in models do the same)
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelArgsError(f"device={device}, but this machine has no CUDA device; pass device=cpu")
        hf_kwargs: dict[str, Any] = {"device_map": device_map or device}
        dtype = load.pop("dtype", "auto")
        hf_kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
        hf_kwargs.update(load)  # revision
        self.settings = settings
        self.config = CausalMMConfig(**settings.config)
        self.cm = CausalMM.from_pretrained(settings.pretrained, self.config, base=settings.base, **settings.switches,
                                           **hf_kwargs)  # fmt: skip
        self.accelerator = accelerator
        self._device = torch.device(device if device_map is None else self.cm.adapter.device)
        if accelerator.num_processes > 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:  # processes without a distributed device (CPU): the launcher's variables, as lmms-eval reads them
            self._rank = int(os.environ.get("RANK", "0"))
            self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.batch_size_per_gpu = settings.batch_size
        self.sample_ids = SampleIds(settings.sample_id)
        self.image_digests = ImageDigests()
        self._warned: set[str] = set()
        #: (task, doc_id) -> (sample seed, image seed) of every request answered: what a run can be checked by
        self.seeds: dict[tuple[str, int], tuple[int, int]] = {}
        if self._rank == 0:
            logger.info(
                f"causalmm: {settings.pretrained} with {self.config.to_dict()} on {self._device}, "
                f"{settings.batch_size} prompt(s) per batch"
            )

    @classmethod
    @_failing_the_command()
    def create_from_arg_string(
        cls, arg_string: str | Mapping[str, Any], additional_config: dict[str, Any] | None = None
    ) -> CausalMMLmms:
        """The model from ``--model_args`` (a string, or a dict of them) and what lmms-eval's command line hands
        every model beside them (``--batch_size``, ``--max_batch_size``, ``--device``).

        lmms-eval's own version passes the two as keyword arguments of one call, so the documented
        ``model_args`` key ``batch_size`` (always on the command line too, default 1) failed; they are merged by
        :func:`~causalmm.lmms.args.merge_command_line`."""
        if isinstance(arg_string, Mapping):
            args = dict(arg_string)
        else:
            from lmms_eval.utils import simple_parse_args_string

            try:
                args = simple_parse_args_string(arg_string)
            except ValueError:
                raise ModelArgsError(f"--model_args {arg_string!r}: give key=value pairs separated by commas") from None
        return cls(**merge_command_line(args, additional_config))

    # -- what lmms-eval reads -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def model(self) -> torch.nn.Module:
        return self.cm.model

    @property
    def tokenizer(self) -> Any:
        return self.cm.engine.tokenizer

    # -- requests -----------------------------------------------------------------------------------------------
    def _image(self, doc: dict[str, Any], doc_to_visual: Any, task: str, doc_id: int) -> Image.Image:
        """The request's one image; several, none, video or audio are refused naming the task."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        flat: list[Any] = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        kinds = {"video" if isinstance(v, str) else "audio" if isinstance(v, dict) else None for v in flat}
        if kinds - {None}:
            raise UnsupportedRequestError(
                f"task {task} (doc {doc_id}) gives {'/'.join(sorted(k for k in kinds if k))} input; causalmm "
                "answers about one image per prompt: run image tasks"
            )
        if len(flat) != 1 or not isinstance(flat[0], Image.Image):
            raise UnsupportedRequestError(
                f"task {task} (doc {doc_id}) gives {len(flat)} images; causalmm answers about exactly one image per "
                "prompt (multi-image and text-only tasks are not supported)"
            )
        return flat[0]

    @_failing_the_command()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request; requests that share task, split and generation options run in batches."""
        prepared = []
        groups: dict[Any, list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            try:
                options, ignored = generation_options(gen_kwargs, self.settings.max_new_tokens)
            except ModelArgsError as err:
                raise UnsupportedRequestError(f"task {task}: {err}") from None
            for key in ignored:
                if key not in self._warned:
                    self._warned.add(key)
                    logger.warning(f"causalmm: task {task} sets generation option {key!r}, which causalmm ignores")
            dataset = self.task_dict[task][split]
            doc = dataset[doc_id]
            image = self._image(doc, doc_to_visual, task, doc_id)
            sid = self.sample_ids(dataset, doc, doc_id, task)
            digest = self.image_digests(dataset, doc_id, image)
            seeds = (sample_seed(self.config.seed, sid), image_seed(self.config.seed, digest))
            self.seeds[(task, int(doc_id))] = seeds
            prepared.append((context, image, seeds, options, gen_kwargs))
            groups.setdefault((task, split, repr(sorted(options.items()))), []).append(i)
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="causalmm")
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                items = [prepared[i] for i in chunk]
                outs = self.cm.generate(
                    [it[1] for it in items],
                    [it[0] for it in items],
                    seeds=[it[2][0] for it in items],
                    image_seeds=[it[2][1] for it in items],
                    **items[0][3],
                )
                for i, it, out in zip(chunk, items, outs, strict=True):
                    results[i] = out.text
                    self.cache_hook.add_partial("generate_until", (it[0], it[4]), out.text)
                bar.update(len(chunk))
        bar.close()
        if self.rank == 0 and requests:
            c = self.image_digests.counts
            logger.info(f"causalmm: image seeds from encoded bytes for {c['bytes']} request(s), pixels {c['pixels']}")
        return results

    @_failing_the_command()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Refused. The rule gives scores inside the factual plausibility cut only (``-inf`` elsewhere): every
        option the factual model finds implausible would score ``-inf``, tied with the others, so ranking given
        options by it says little; a teacher-forced likelihood without the cut is not the method's rule."""
        raise UnsupportedRequestError(
            "causalmm generates answers (generate_until tasks: pope, mme, ...); it does not score given "
            f"continuations, which {LOGLIKELIHOOD_TASKS} need: run those with a regular model or their "
            "generate_until variants"
        )

    @_failing_the_command()
    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise UnsupportedRequestError(
            "causalmm answers single-round requests; multi-round tasks (output_type generate_until_multi_round) "
            "are not supported"
        )
