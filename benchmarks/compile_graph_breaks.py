"""Graph breaks of the nine Hugging Face families under ``torch.compile``, plain and converted.

For each family of issue 25 (tiny configs of tests/test_reparam_models.py, eager attention),
the plain model and the model converted by :func:`sigma_core.reparam.convert_to_sigma_reparam`,
in training mode: ``torch._dynamo.explain(model)(**inputs)`` gives the number of graphs, of
graph breaks and the reasons (docs/reparam.md, "torch.compile").  Needs transformers.

Usage::

    .venv/bin/python benchmarks/compile_graph_breaks.py
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

NINE = ("t5", "gpt_neox", "mistral", "qwen2", "gemma2", "vit", "whisper", "bart", "distilbert")


def main() -> None:
    from test_reparam_models import MODELS, _convert  # noqa: PLC0415  (tests/ on sys.path)

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import transformers  # noqa: PLC0415

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("family\tmodel\tgraphs\tbreaks\treasons")
    for name in NINE:
        for converted in (False, True):
            torch._dynamo.reset()
            model, inputs = MODELS[name][0]()
            if converted:
                _convert(model)
            model.train()
            ex = torch._dynamo.explain(model)(**inputs)
            reasons = sorted({str(r.reason).splitlines()[0][:200] for r in ex.break_reasons})
            print(f"{name}\t{'converted' if converted else 'plain'}\t{ex.graph_count}\t{ex.graph_break_count}\t"
                  f"{'; '.join(reasons) or '-'}", flush=True)


if __name__ == "__main__":
    main()
