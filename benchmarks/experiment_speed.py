#!/usr/bin/env python
"""Seconds per training step of each experiment arm, and the cost of one evaluation with every probe.

Sizes ``conditune experiment`` runs from speeds measured here (docs/experiment.md, "Scale"): each arm of the
config trains a few main steps on the given manifests (set-up timed apart: PiSSA's and OSF's SVDs happen
there), the arms interleaved over ``--rounds`` so that a change of machine load hits them alike; then one
evaluation's parts are timed on the last model: dev transcription, held-out text (perplexity + KL), greedy
agreement, and the knowledge questions through the base (once per process) and the adapted model.

    python benchmarks/experiment_speed.py configs/experiment_v2.yaml \\
        --train ~/.cache/conditune/demo/speech/train.jsonl --dev ~/.cache/conditune/demo/speech/dev.jsonl \\
        --heldout en=~/.cache/conditune/demo/speech/heldout_text.en.txt --knowledge mmlu.jsonl \\
        --arms lowest-kappa,lora,spectrum,pissa,osf --steps 4 --output results/experiment_v2/speed.json

The alignment stage is skipped (``training.align_steps=0``), so the CTC head is untrained and, with
``model.ctc.compress``, the LLM reads almost no audio positions: such step times are a lower bound. With
``--no-compress`` the LLM reads every audio position (about 1.7 x the compressed length after alignment):
an upper bound. The ratios between arms hold either way. Writes JSON atomically (machine and load included).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from conditune.errors import CondituneError
from conditune.io import atomic_write_json
from conditune.machine import machine_description


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--heldout", action="append", default=[], metavar="LANG=PATH")
    p.add_argument("--knowledge", type=Path, help="an mmlu.jsonl-format file")
    p.add_argument("--questions", type=int, default=24, help="knowledge questions timed (cost is per question)")
    p.add_argument("--arms", default="lowest-kappa,lora,spectrum,pissa,osf")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-compress", action="store_true")
    p.add_argument("--output", type=Path, required=True)
    return p.parse_args(argv)


def time_arm(cfg, plan, folder: Path, steps: int) -> dict:
    from conditune.training.trainer import Trainer

    tc = cfg.train_config_for(0, folder, plan.trainable)
    tc.training.align_steps, tc.training.max_steps, tc.evaluation.every = 0, steps, 0
    tc.output.overwrite, tc.output.save_every = True, 0
    began = time.monotonic()
    trainer = Trainer(tc)
    trainer.setup()
    setup_s = time.monotonic() - began
    result = trainer.fit(stop_after_steps=steps)
    return {"setup_s": round(setup_s, 2), "seconds_per_step": round(result.seconds_per_step, 3),
            "trainable_llm_params": result.trainable_llm_params, "load": os.getloadavg()[0], "trainer": trainer}  # fmt: skip


def time_evaluation(trainer, cfg, args) -> dict:
    from conditune.evaluation.forgetting import ForgettingProbe, read_knowledge_questions, read_texts
    from conditune.evaluation.pair import load_base_llm
    from conditune.evaluation.transcription import evaluate_examples

    out = {"load_before": os.getloadavg()[0]}
    t = time.monotonic()
    evaluate_examples(
        trainer.model, trainer.processor, trainer.dev_examples, max_new_tokens=cfg.evaluation.max_new_tokens
    )
    out["dev_utterances"] = len(trainer.dev_examples)
    out["dev_s_per_utterance"] = round((time.monotonic() - t) / max(1, len(trainer.dev_examples)), 3)
    base = load_base_llm(cfg.model.llm)
    tok = trainer.processor.tokenizer
    texts = {k: read_texts(Path(v).expanduser()) for k, v in (h.split("=", 1) for h in args.heldout)}
    probe = ForgettingProbe(texts, {"en": ["What is the capital of France?", "Name three primary colours."]},
                            max_tokens=cfg.experiment.max_tokens, agreement_new_tokens=cfg.experiment.agreement_new_tokens)  # fmt: skip
    t = time.monotonic()
    r = probe.measure(base, trainer.model.llm, tok, knowledge=False)
    sentences = sum(m["texts"] for m in r.text.values())
    t_agree = time.monotonic()
    ForgettingProbe({}, probe.prompts, agreement_new_tokens=cfg.experiment.agreement_new_tokens).measure(
        base, trainer.model.llm, tok
    )
    agree_s = time.monotonic() - t_agree
    text_s = (t_agree - t) - agree_s
    out.update(heldout_sentences=sentences, heldout_s_per_sentence=round(text_s / max(1, sentences), 3),
               agreement_s_per_prompt=round(agree_s / len(probe.prompts["en"]), 3))  # fmt: skip
    if args.knowledge:
        questions = read_knowledge_questions(args.knowledge)
        kp = ForgettingProbe(
            questions=questions,
            knowledge_count=args.questions,
            knowledge_max_tokens=cfg.experiment.knowledge_max_tokens,
        )
        t = time.monotonic()
        first = kp.measure(base, trainer.model.llm, tok)  # base and adapted
        both = time.monotonic() - t
        t = time.monotonic()
        kp.measure(base, trainer.model.llm, tok)  # adapted only: the base's scores are kept
        adapted = time.monotonic() - t
        n = len(first.knowledge["items"])
        out.update(knowledge_questions=n, knowledge_s_per_question_first=round(both / n, 3),
                   knowledge_s_per_question_later=round(adapted / n, 3))  # fmt: skip
    out["load_after"] = os.getloadavg()[0]
    return out


def main(argv=None) -> int:
    args = parse(argv)
    from conditune.experiment.arms import load_scan, needs_full_spectrum, plan_arms
    from conditune.experiment.config import load_experiment_config

    heldout = {k: str(Path(v).expanduser()) for k, v in (h.split("=", 1) for h in args.heldout)}
    arms = args.arms.split(",")
    overrides = [*args.overrides, f"data.train={Path(args.train).expanduser()}", f"data.dev={Path(args.dev).expanduser()}",
                 f"experiment.arms=[{','.join(arms)}]", "experiment.long_horizon.arms=[]", "experiment.knowledge_probe=null"]  # fmt: skip
    if args.no_compress:
        overrides += ["model.ctc.compress=false", "model.ctc.readout=adaptor"]
    cfg = load_experiment_config(args.config, [*overrides, f"experiment.heldout_text={heldout}".replace("'", '"')])
    records, meta = load_scan(cfg)
    full = load_scan(cfg, spectrum="full")[0] if needs_full_spectrum(cfg) else None
    plans = plan_arms(cfg, records, 0, meta, full_records=full)
    doc = {"machine": machine_description(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": args.steps,
           "compress": not args.no_compress, "arms": {}}  # fmt: skip
    trainer = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in arms:
                m = time_arm(cfg, plans[arm], Path(tmp) / arm, args.steps)
                trainer = m.pop("trainer")
                doc["arms"].setdefault(arm, []).append(m)
                print(f"round {r} {arm}: {m}", file=sys.stderr)
                atomic_write_json(args.output, doc)
        doc["evaluation"] = time_evaluation(trainer, cfg, args)
    atomic_write_json(args.output, doc)
    print(doc["evaluation"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CondituneError as exc:
        sys.exit(f"experiment_speed: {exc}")
