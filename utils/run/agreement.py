"""Every rank of a run trains on the same flags, tokenizer and data, or the run does not start.

Nodes often read node-local copies of the data. A copy whose class folders sort otherwise permutes that node's
labels without a sign; one with fewer images, or a flag that differs (say --save_every), puts the ranks' collectives
out of step: gloo then fails on a size mismatch naming nothing, NCCL waits until its timeout. Paths may differ per
node (`NODE_LOCAL_FLAGS`); what they lead to is compared instead.
"""
from typing import Any

from torch.utils.data import Dataset

import dist
from utils.data.loaders import class_names, file_list_digest

# paths that may differ per node (out_dir: the tokenizer trainer's output folder, out: extract_tokens' cache, whose
# ranks compare the manifest they see there instead), and the per-rank loader workers
NODE_LOCAL_FLAGS = frozenset({"data_path", "fmnist_dir", "tokens", "vae_ckpt", "init_from", "resume", "eval_net",
                              "local_out_dir_path", "out_dir", "out", "local_rank", "workers"})


def _brief(value: Any, reference: Any) -> str:
    """`value` in a few words; a long list by its length and its first item that differs from `reference`."""
    if isinstance(value, (list, tuple)) and len(value) > 4:
        if value == reference:
            return f"{len(value)} items"
        reference = reference if isinstance(reference, (list, tuple)) else ()
        first = next((i for i, (a, b) in enumerate(zip(value, reference, strict=False)) if a != b),
                     min(len(value), len(reference)))
        return f"{len(value)} items, " + (f"item {first} = {value[first]!r}" if first < len(value) else
                                          f"the first {first} of rank 0's")
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rank_disagreements(facts: dict[str, Any]) -> list[str]:
    """Collective: a line for each fact whose value is not the same on every rank ('name: rank 0: v; rank 1: w',
    ranks of one value together); [] when all agree."""
    everyone = dist.all_gather_object(facts)
    lines = []
    for name in dict.fromkeys(name for f in everyone for name in f):  # a fact some rank lacks differs there too
        values = [f.get(name) for f in everyone]
        if all(v == values[0] for v in values):
            continue
        ranks_of: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            ranks_of.setdefault(_brief(v, values[0]), []).append(rank)
        lines.append(f"{name}: " + "; ".join(f"rank{'s' * (len(r) > 1)} {','.join(map(str, r[:8]))}"
                                             f"{',...' * (len(r) > 8)}: {v}" for v, r in ranks_of.items()))
    return lines


def refuse_disagreement(facts: dict[str, Any], error: type[Exception], what: str) -> None:
    """Collective: raise `error` ("`what`:" then a line per fact that differs, `rank_disagreements`) when the ranks
    disagree; every caller that checks its ranks refuses so."""
    if problems := rank_disagreements(facts):
        raise error(f"{what}:\n  " + "\n  ".join(problems))


def run_facts(flags: dict[str, Any], tokenizer_digest: str, train_set: Dataset, val_set: Dataset,
              file_digests: tuple[str | None, str | None] | None = None) -> dict[str, Any]:
    """What every rank must share: the flags but the node-local paths, the tokenizer's weights, the data (its
    classes in label order, its size, its files). `file_digests`: the two splits' `file_list_digest` where the
    caller has them already (hashing ImageNet's list takes about a second), else computed here."""
    train_files, val_files = file_digests or (file_list_digest(train_set), file_list_digest(val_set))
    facts: dict[str, Any] = {f"--{k}": v for k, v in sorted(flags.items()) if k not in NODE_LOCAL_FLAGS}
    facts.update({"the tokenizer's weights (digest)": tokenizer_digest,
                  "the class folders (in label order)": class_names(train_set),
                  "the training images": len(train_set), "the validation images": len(val_set),
                  "the training files (digest of their paths and labels)": train_files,
                  "the validation files (digest of their paths and labels)": val_files})
    return facts
