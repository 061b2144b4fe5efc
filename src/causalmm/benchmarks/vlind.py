"""VLind-Bench (Lee et al., 2024, "VLind-Bench: Measuring Language Priors in Large Vision-Language Models").

Source followed: the official repository ``klee972/VLind-Bench`` (``eval/gpt4o_eval.py``,
``eval/instructblip_eval.py`` for prompts, images and answer parsing; ``eval/score_pipeline.py`` for scoring).

Data (the official release, Hugging Face ``klee972/VLind-Bench``, folder ``VLind-Bench Dataset``)::

    data.json                       a JSON array, one object per instance
    images/factual/{concept}/{context_id}_{factual_context}/0.jpg
    images/counterfactual/{concept}/{context_id}_{context}/{image_id}.jpg      image_id "0".."11"

An instance has ``concept``, ``context_id``, ``context`` (the counterfactual context), ``factual_context``,
``true_statement`` (true in the counterfactual world), ``false_statement`` (true in the real world),
``existent_noun``, ``non-existent_noun``, ``best_img_id`` and ``aggregated_human_label_good_images``
(counterfactual image id -> number of annotators who judged the image good). ``data`` may be ``data.json``
or its folder; ``images`` defaults to the ``images`` folder beside ``data.json``.
The instance id used here is ``"{concept}/{context_id}"`` (a duplicate is an error).

Good images: counterfactual images with ``votes >= vote_thres`` (default 2) whose id is among the considered
ids of ``style`` (``all``: "0".."11"; ``photorealistic``: 0-3; ``illustration``: 4-7; ``cartoon``: 8-11).
An instance without good images is skipped entirely, by the official inference and scoring alike.

The four tests (two statements each; statement 1 expects "True", statement 2 "False"; ids
``{instance}/{test}/{image}/{1|2}``):

* ``ck`` commonsense knowledge -- the *factual* image (not text-only); 1: ``false_statement``,
  2: ``true_statement``, asked "based on common sense".
* ``vp`` visual perception -- the best counterfactual image (``best_img_id``); 1: "There is {existent_noun}
  in the given image.", 2: the same with ``non-existent_noun``.
* ``cb`` commonsense bias -- the best counterfactual image and the counterfactual ``context`` in the prompt;
  1: ``true_statement``, 2: ``false_statement``, asked "based on the context".
* ``lp`` language prior -- every good counterfactual image, no context; 1: ``true_statement``,
  2: ``false_statement``, asked "based on the image".

Prompts (``prompts`` option): ``gpt4o`` (default; ``gpt4o_eval.py``: commonsense_TF, simple_TF, detailed_TF,
detailed_TF) or ``instructblip`` (``instructblip_eval.py``: the "Only respond in True or False." first variants).

Parsing (official ``infer_true_or_false``): lower-case, newlines to spaces, drop ``,`` and ``.``, split on
single spaces; the first word that is exactly ``true`` or ``false`` decides; otherwise ``NA`` (counted in
``unparseable``, and wrong). So "It is true that..." is True, while "True!" or "**True**" are NA. A
prediction file's ``answer`` field, where present, is used as is, as ``score_pipeline.py`` does (it never
reads ``response``); only a prediction without ``answer`` has its ``response`` parsed. More than half the
answers NA warns (:class:`~causalmm.benchmarks.base.UnparseableWarning`).

Metrics (percent, as the paper and ``score_pipeline.py`` print them), over the N instances that have good
images; a test *passes* when both of its statements are answered right:

* ``S_CK`` = #CK-pass / N
* ``S_VP`` = #VP-pass / N
* ``S_CB`` = #(CK-pass and CB-pass) / #CK-pass                 (0 when no instance passes CK, as official)
* ``S_LP`` = sum over instances passing CK, VP and CB of (fraction of its good images passing LP)
  / #(CK, VP and CB pass)                                       (per-instance macro; 0 when none, as official)
* ``CB``   = #CB-pass / N                                       (unconditional)
* ``LP``   = sum over all instances of (fraction of its good images passing LP) / N    (unconditional, macro)
* ``S_LP_micro`` = #good images passing LP of instances passing CK, VP, CB / #their good images (computed,
  not printed, by the official script).

Counts: ``n_instances`` (N), ``n_images`` (good images), ``n_CB`` (S_CB's denominator, #CK-pass), ``n_LP``
(S_LP's denominator), ``unparseable`` (records answered NA) and ``unparseable_pct``, ``n`` (records). A
bootstrap sample that repeats an instance counts it as often as it repeats.

Native format: the official inference writes answers into ``data.json`` itself: ``{mid}_pred_a1_image``,
``_a2_image`` (CK), ``_b1``, ``_b2`` (VP), ``_c1_image``, ``_c2_image`` (CB), each ``{"response", "answer"}``,
and ``_d1``, ``_d2`` (LP) mapping image id -> ``{"response", "answer"}``; ``score_pipeline.py -dp FILE -mid
{mid}`` scores it. :meth:`VLind.write_native` writes ``mid = causalmm`` (option ``model_key``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Benchmark, BenchmarkError, Sample, id_field, read_json_records, str_field, unparseable_pct
from .vlind_native import NATIVE, model_key, write_data_json
from .vlind_prompts import PROMPTS, infer_true_or_false

__all__ = ["VLind", "infer_true_or_false"]

TESTS = ("ck", "vp", "cb", "lp")
STYLES = {
    "all": frozenset(str(i) for i in range(12)),
    "photorealistic": frozenset({"0", "1", "2", "3"}),
    "illustration": frozenset({"4", "5", "6", "7"}),
    "cartoon": frozenset({"8", "9", "10", "11"}),
}
#: the instance fields of ``data.json`` carried in each record (and written back by ``write_native``)
FIELDS = (
    "concept",
    "context_id",
    "context",
    "factual_context",
    "true_statement",
    "false_statement",
    "existent_noun",
    "non-existent_noun",
    "best_img_id",
    "aggregated_human_label_good_images",
)
#: the fields that become prompt text or image paths: strings, refused otherwise (a null noun would be asked
#: as "There is None in the given image.")
_TEXT_FIELDS = tuple(f for f in FIELDS if f not in ("context_id", "best_img_id", "aggregated_human_label_good_images"))
_EXPECTED = {1: "True", 2: "False"}


def _resolve_data(data: Path) -> Path:
    data = Path(data)
    return data / "data.json" if data.is_dir() else data


class VLind(Benchmark):
    """VLind-Bench. Options: ``vote_thres`` (good-image votes, default 2), ``style`` (all | photorealistic |
    illustration | cartoon), ``prompts`` (gpt4o | instructblip), ``model_key`` (the ``{mid}`` of the
    ``{mid}_pred_*`` fields to read, and to write; default: the only one present / ``causalmm``)."""

    name = "vlind"
    max_new_tokens = 16
    primary = "S_LP"
    paired_test = "bootstrap"
    headline = ("S_LP", "S_CK", "S_VP", "S_CB", "CB", "LP")

    def __init__(
        self,
        *,
        vote_thres: int = 2,
        style: str = "all",
        prompts: str = "gpt4o",
        model_key: str | None = None,
    ) -> None:
        if style not in STYLES:
            raise BenchmarkError(f"VLind-Bench style {style!r} is unknown; choose one of {', '.join(STYLES)}")
        if prompts not in PROMPTS:
            raise BenchmarkError(f"VLind-Bench prompts {prompts!r} are unknown; choose gpt4o or instructblip")
        if isinstance(vote_thres, bool) or not isinstance(vote_thres, int):
            raise BenchmarkError(f"VLind-Bench vote_thres must be an integer, not {vote_thres!r}")
        if model_key is not None:
            model_key = str(model_key).removesuffix("_pred")
            if not model_key:
                raise BenchmarkError("VLind-Bench model_key must not be empty")
        super().__init__(vote_thres=vote_thres, style=style, prompts=prompts, model_key=model_key)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k != "model_key"}

    # -- data ---------------------------------------------------------------------------------------
    def load(self, data: Path, images: Path | None) -> list[Sample]:
        path = _resolve_data(data)
        image_root = Path(images) if images is not None else path.parent / "images"
        return self._samples(self._instances(path, what="VLind-Bench data"), path, image_root)

    def _instances(self, path: Path, *, what: str) -> list[tuple[str, dict[str, Any], str]]:
        """(instance id, instance, where) of every instance of ``path``, validated."""
        items = read_json_records(path, what=what)
        if not items:
            raise BenchmarkError(f"{what} file {path} holds no instances")
        out, seen = [], {}
        for index, (lineno, inst) in enumerate(items, 1):
            where = f"{path}: line {lineno} (instance {index})" if lineno else f"{path}: instance {index}"
            if not isinstance(inst, dict):
                raise BenchmarkError(f"{where}: expected an object with the fields {', '.join(FIELDS)}")
            if "non-existent_noun" not in inst and "non_existent_noun" in inst:
                inst = {**inst, "non-existent_noun": inst["non_existent_noun"]}
            missing = [k for k in FIELDS if k not in inst]
            if missing:
                raise BenchmarkError(f"{where}: missing field(s) {', '.join(missing)}")
            votes = inst["aggregated_human_label_good_images"]
            if not isinstance(votes, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in votes.values()
            ):
                raise BenchmarkError(
                    f"{where}: aggregated_human_label_good_images must map image ids to vote counts, got {votes!r}"
                )
            for key in _TEXT_FIELDS:
                str_field(inst, key, where)
            iid = f"{inst['concept']}/{id_field(inst, 'context_id', where)}"
            id_field(inst, "best_img_id", where)
            if iid in seen:
                raise BenchmarkError(f"{where}: duplicate instance {iid} (concept/context_id), first at {seen[iid]}")
            seen[iid] = where
            out.append((iid, inst, where))
        return out

    def _good_images(self, inst: dict[str, Any]) -> list[str]:
        """Good counterfactual image ids, in the file's order (as the official loops iterate them)."""
        considered = STYLES[self.options["style"]]
        thres = self.options["vote_thres"]
        return [
            str(k) for k, v in inst["aggregated_human_label_good_images"].items() if v >= thres and str(k) in considered
        ]

    def _samples(
        self, instances: list[tuple[str, dict[str, Any], str]], path: Path, image_root: Path | None
    ) -> list[Sample]:
        make_prompt = PROMPTS[self.options["prompts"]]
        samples: list[Sample] = []
        for iid, inst, where in instances:
            good = self._good_images(inst)
            if not good:
                continue
            source = {k: inst[k] for k in FIELDS}
            best = str(inst["best_img_id"])
            cf_dir = f"counterfactual/{inst['concept']}/{inst['context_id']}_{inst['context']}"
            factual = f"factual/{inst['concept']}/{inst['context_id']}_{inst['factual_context']}/0.jpg"
            vp = (
                f"There is {inst['existent_noun']} in the given image.",
                f"There is {inst['non-existent_noun']} in the given image.",
            )
            plan = [
                ("ck", "factual", factual, (inst["false_statement"], inst["true_statement"])),
                ("vp", best, f"{cf_dir}/{best}.jpg", vp),
                ("cb", best, f"{cf_dir}/{best}.jpg", (inst["true_statement"], inst["false_statement"])),
            ] + [("lp", g, f"{cf_dir}/{g}.jpg", (inst["true_statement"], inst["false_statement"])) for g in good]
            for test, image_id, rel, statements in plan:
                image = _image_file(image_root / rel) if image_root is not None else None
                for k, statement in enumerate(statements, 1):
                    meta = {
                        "instance": iid,
                        "test": test,
                        "image_id": image_id,
                        "statement": k,
                        "expected": _EXPECTED[k],
                        "source": source,
                    }
                    prompt = make_prompt(test, statement, inst["context"])
                    samples.append(Sample(f"{iid}/{test}/{image_id}/{k}", image, prompt, meta, where))
        if not samples:
            raise BenchmarkError(
                f"{path}: no instance has a counterfactual image with >= {self.options['vote_thres']} good-image "
                f"votes (style {self.options['style']})"
            )
        return samples

    # -- scoring ------------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record's ``given_answer`` when it has one (a prediction file's ``answer``, which the official
        ``score_pipeline.py`` reads and never re-derives: anything but "True"/"False" is wrong there, "NA"
        here), else the official ``infer_true_or_false`` of its text."""
        given = record.get("given_answer")
        if isinstance(given, str):
            answer = given if given in ("True", "False") else "NA"
        else:
            answer = infer_true_or_false(str(record.get("text") or ""))
        return {"answer": answer, "parseable": answer != "NA"}

    def unit(self, record: dict[str, Any]) -> str:
        return str(record["instance"])

    def correct(self, record: dict[str, Any]) -> bool | None:
        return record["answer"] == record["expected"]

    def label_of(self, record: dict[str, Any]) -> str | None:
        return str(record["expected"])

    def metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        # instance -> [number of records, {(test, image, statement): right}]; repeated ids are bootstrap copies
        groups: dict[str, list[Any]] = {}
        unparseable = 0
        for r in records:
            g = groups.get(r["instance"])
            if g is None:
                g = groups[r["instance"]] = [0, {}]
            g[0] += 1
            answer = r["answer"]
            g[1][(r["test"], r["image_id"], r["statement"])] = answer == r["expected"]
            if answer == "NA":
                unparseable += 1
        n = n_images = a_sum = b_sum = c_sum = ac_sum = abc_sum = 0.0
        d_sum = d_pass_sum = d_pass_micro = abc_images = 0.0
        for inst, (count, right) in groups.items():
            passed = {"ck": True, "vp": True, "cb": True}
            lp: dict[str, list[bool]] = {}
            for (test, image_id, _k), ok in right.items():
                if test == "lp":
                    lp.setdefault(image_id, []).append(ok)
                else:
                    passed[test] = passed[test] and ok
            # the loader emits no instance without good images (the official scorer skips those), so an
            # instance here without LP answers, or lacking any answer, is an incomplete run
            if not lp or len(right) != 6 + 2 * len(lp) or any(len(v) != 2 for v in lp.values()):
                raise BenchmarkError(
                    f"VLind-Bench instance {inst}: incomplete answers ({len(right)} of {6 + 2 * len(lp)} prompts "
                    "answered); every instance needs both statements of CK, VP, CB and LP on each good image"
                )
            w = count / len(right)
            a, b, c = passed["ck"], passed["vp"], passed["cb"]
            d_pass = sum(1 for v in lp.values() if v[0] and v[1])
            d_macro = d_pass / len(lp)
            n += w
            n_images += w * len(lp)
            a_sum += w * a
            b_sum += w * b
            c_sum += w * c
            ac_sum += w * (a and c)
            d_sum += w * d_macro
            if a and b and c:
                abc_sum += w
                d_pass_sum += w * d_macro
                d_pass_micro += w * d_pass
                abc_images += w * len(lp)
        if n == 0:
            raise BenchmarkError("VLind-Bench: no records to score")
        return {
            "S_CK": 100 * a_sum / n,
            "S_VP": 100 * b_sum / n,
            "S_CB": 100 * ac_sum / a_sum if a_sum else 0.0,
            "S_LP": 100 * d_pass_sum / abc_sum if abc_sum else 0.0,
            "CB": 100 * c_sum / n,
            "LP": 100 * d_sum / n,
            "S_LP_micro": 100 * d_pass_micro / abc_images if abc_images else 0.0,
            "n_instances": n,
            "n_images": n_images,
            "n_CB": a_sum,
            "n_LP": abc_sum,
            "unparseable": float(unparseable),
            "unparseable_pct": unparseable_pct(self.name, unparseable, len(records), "no True/False answer"),
            "n": float(len(records)),
        }

    # -- the field's formats ------------------------------------------------------------------------
    def read_predictions(self, path: Path, data: Path | None, annotations: Path | None) -> list[dict[str, Any]]:
        """Records from a VLind-Bench prediction file (``data.json`` with ``{mid}_pred_*`` fields).

        Each prediction's ``answer`` is what ``score_pipeline.py`` scores, so it is kept as ``given_answer``
        and :meth:`parse` uses it; ``response`` (the record's ``text``) is parsed only where ``answer`` is
        absent. Both must be strings. Instances are matched to ``data`` (when given; else the prediction
        file's own instances) by ``concept/context_id``; every prompt of every instance with good images must
        be answered.
        """
        path = Path(path)
        pred = self._instances(path, what="VLind-Bench prediction")
        mid = model_key(pred, path, self.options["model_key"])
        by_id = {iid: (inst, where) for iid, inst, where in pred}
        if data is not None:
            data_path = _resolve_data(data)
            reference = self._instances(data_path, what="VLind-Bench data")
            known = {iid for iid, _, _ in reference}
            stray = [iid for iid in by_id if iid not in known and self._good_images(by_id[iid][0])]
            if stray:
                raise BenchmarkError(f"{path}: instance(s) {', '.join(stray[:3])} are not in {data_path}")
        else:
            data_path, reference = path, pred
        samples = self._samples(reference, data_path, None)
        records = []
        for s in samples:
            m = s.meta
            if m["instance"] not in by_id:
                raise BenchmarkError(f"{path} has no predictions for instance {m['instance']} of {data_path}")
            inst, where = by_id[m["instance"]]
            key = f"{mid}_pred_{NATIVE[(m['test'], m['statement'])]}"
            entry = inst.get(key)
            if m["test"] == "lp":
                entry = entry.get(m["image_id"]) if isinstance(entry, dict) else None
                key = f"{key}[{m['image_id']!r}]"
            if not isinstance(entry, dict) or not ("response" in entry or "answer" in entry):
                raise BenchmarkError(f"{where} ({m['instance']}): no {key} with a response")
            place = f"{where} ({m['instance']}) {key}"
            fields = {f: str_field(entry, f, place, blank_ok=True) for f in ("response", "answer") if f in entry}
            record = {"id": s.id, "text": fields.get("response", fields.get("answer")), **m}
            if "answer" in fields:
                record["given_answer"] = fields["answer"]
            records.append(record)
        return records

    def write_native(self, records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
        """``data.json`` with ``{mid}_pred_*`` fields (``data_seed{S}.json`` per seed when several), for
        ``score_pipeline.py -dp FILE -mid {mid}``."""
        return write_data_json(records, out, self.options["model_key"] or "causalmm")


def _image_file(path: Path) -> Path:
    """The official ``.jpg`` path, or the same image saved as ``.png`` when only that exists (lossless exports)."""
    if not path.is_file():
        png = path.with_suffix(".png")
        if png.is_file():
            return png
    return path
