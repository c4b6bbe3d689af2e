"""Direct logit attribution (Argument 4): how much each head adds to the logit of the correct next
token, and whether it adds more on the second copy of a repeated passage (where an induction head
can help) than on the first."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import hooks as Hk
from .heads import top_induction_head
from .model import Transformer
from .runs import Run
from .stats import bootstrap_ci


@torch.no_grad()
def direct_logit_attribution(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, H, T-1): each head's direct-path contribution to the logit of the actual next token,
    minus its mean contribution over the vocabulary. The final LayerNorm is linearised at the
    clean run's scale (its centring and 1/std applied to each head's output, then its weight)."""
    names = Hk.result_names(model) + ["hook_resid_final"]
    with Hk.cache(model, names) as c:
        model(tokens)
    res = torch.stack([c[f"blocks.{l}.attn.hook_result"] for l in range(model.cfg.n_layers)], 1).float()
    # res (B, L, T, H, D)
    if model.cfg.layer_norm:
        r = c["hook_resid_final"].float()  # (B, T, D)
        std = (r.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # (B, T, 1)
        res = (res - res.mean(-1, keepdim=True)) / std[:, None, :, None, :]
        res = res * model.ln_final.w.float()
    W_U = model.W_U.float()
    W_c = W_U - W_U.mean(1, keepdim=True)  # centred over the vocabulary
    nxt = tokens[:, 1:]  # (B, T-1)
    cols = W_c[:, nxt]  # (D, B, T-1)
    out = torch.einsum("bltkd,dbt->blkt", res[:, :, :-1], cols)  # (B, L, H, T-1)
    return out


def repeated_passage(run: Run, example, step: int | None = None) -> dict:
    """Attention of the top induction head and each head's direct logit attribution on an exactly
    repeated real passage (an example of the 'exact repeat' task)."""
    model = run.load(step)
    l, h, _ = top_induction_head(run, step)
    x = example.tokens[None]
    with Hk.cache_patterns(model) as c:
        model(x)
    pat = Hk.stack_patterns(model, c)[0, l, h].float().numpy()
    dla = direct_logit_attribution(model, x)[0].numpy()  # (L, H, T-1)
    return {"pattern": pat, "dla": dla, "head": (l, h), "b_start": example.b_start,
            "tokens": [run.corpus.token_str(int(t)) for t in example.tokens]}


def dla_by_copy(run: Run, examples: list, step: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Mean direct logit attribution per head on the first vs the second copy of repeated passages,
    with intervals over passages: the second copy is where an induction head can help."""
    model = run.load(step)
    per = []
    for ex in examples:
        d = direct_logit_attribution(model, ex.tokens[None])[0]  # (L, H, T-1)
        b = ex.b_start
        n = len(ex.tokens) - b - 1
        first = d[:, :, 1:1 + n].mean(-1)  # predictions of A's tokens 2..: (L, H)
        second = d[:, :, b:b + n].mean(-1)  # predictions of B's tokens 2..
        per.append(torch.stack([first, second]).numpy())
    per = np.stack(per)  # (N, 2, L, H)
    rows = []
    for l in range(per.shape[2]):
        for h in range(per.shape[3]):
            for k, copy in enumerate(("first copy", "second copy")):
                m, lo, hi = bootstrap_ci(per[:, k, l, h], seed=seed)
                rows.append({"layer": l, "head": h, "copy": copy, "dla": m, "lo": lo, "hi": hi})
            m, lo, hi = bootstrap_ci(per[:, 1, l, h] - per[:, 0, l, h], seed=seed)
            rows.append({"layer": l, "head": h, "copy": "difference", "dla": m, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


