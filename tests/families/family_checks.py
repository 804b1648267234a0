"""The per-model-type checks of issue 12, shared by tests/families and bench/families.py.

For one model type of the installed transformers: the family is derived (or refused with its reason), a tiny
model is saved with ``save_pretrained``, the checkpoint opens, view -> write is bit-identical, the streamed
profile's statistics equal a brute-force loop over tokens on the full transformers model, and the outputs of
``prune --method frequency`` and ``quantize --plan uniform --method rtn`` load in plain transformers with no
missing or unexpected keys, and the pruned logits equal the base model's with the removed experts masked out of
routing."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from family_models import build, model_class, tiny_config
from moecompress.calibration.sets import calibration_set, load_tokenizer
from safetensors.torch import load_file
from transformers import AutoConfig

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError
from moecompress.core.families import family_for
from moecompress.profile.run import collect

OPS = ("open", "view_write", "profile", "prune", "quantize")
# the other commands, run by bench/families.py for the README table (on the tiny model and the prune output)
EXTRA_OPS = ("info", "atom", "merge", "eval", "load", "report")


def refusal_reason(message: str) -> str:
    """The reason part of family_for's one-line refusal."""
    m = re.search(r"cannot read: (.*); supported:", message)
    if m:
        return m[1]
    return re.sub(r"; supported.*", "", message)


def family_or_refusal(model_type: str) -> tuple[Any, str | None]:
    """(tiny config, None) when moecompress derives a family for it, else (None, the refusal reason)."""
    try:
        cfg = tiny_config(model_type)
    except Exception:  # a config class that refuses the tiny sizes: judge its defaults
        try:
            cfg = AutoConfig.for_model(model_type)
        except Exception as err:
            return None, f"transformers has no config class registered for it ({type(err).__name__})"
    try:
        family_for(cfg)
    except UserError as err:
        return None, refusal_reason(str(err))
    return cfg, None


def reload_clean(path: Path) -> torch.nn.Module:
    """from_pretrained with no missing/unexpected/mismatched keys and no transformers warning."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = model_class(AutoConfig.from_pretrained(path))  # a multimodal wrapper: image-text-to-text
            model, info = auto.from_pretrained(path, experts_implementation="eager", output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    bad = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    assert not bad, bad
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warned, warned[:2]
    return model.eval()


def from_pretrained(path: Path) -> torch.nn.Module:
    """The full transformers model of a folder in float32 (a multimodal wrapper with its vision tower)."""
    auto = model_class(AutoConfig.from_pretrained(path))
    return auto.from_pretrained(path, experts_implementation="eager", dtype=torch.float32).eval()


def decoder_layers(model: torch.nn.Module, fam: Any) -> Any:
    """The language model's decoder layers (a multimodal wrapper's text model, e.g. model.language_model.layers)."""
    return model.get_submodule(fam.nest[0]).layers if fam.nest else model.model.layers


def moe_block(layer: torch.nn.Module, fam: Any) -> torch.nn.Module:
    """A decoder layer's MoE block in transformers' own model: the layer itself where it holds its router and
    experts (Gemma-4; the view's ``<layer>.moe``, ``interface.DecoderLayerMoe``). (Mistral-Large-4's checkpoint
    saves its real ``mlp`` block's parts in the layer: layer_parts too, but the module is there.)"""
    block = getattr(layer, fam.module_block, None)
    return block if isinstance(block, torch.nn.Module) else layer


def check_view_write(ck: Checkpoint) -> None:
    disk: dict[str, torch.Tensor] = {}
    for f in sorted(set(ck.weight_map.values())):
        disk.update({ck.view_key(k): v for k, v in load_file(str(ck.path / f)).items()})
    for l in ck.moe_layers:
        w = ck.moe_weights(l)
        E, I, H = w.gate.shape
        # the router reads the block input: [E, hidden], where the experts run over H (MuseSpark: moe_hidden_size)
        width = ck.config.get_text_config().hidden_size if ck.family.post_norm else H
        assert w.down.shape == (E, H, I) and w.router.shape == (E, width) and E == ck.num_experts
        written = ck.family.write_layer(w, l)
        assert set(written) == {k for k in disk if ck.family.routed_key_pattern(l).match(k)}, l
        for k, v in written.items():
            assert torch.equal(v, disk[k]) and v.dtype == disk[k].dtype, k


def brute_force(path: Path, input_ids: torch.Tensor, domains: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    """Full transformers model, one token and one chosen expert at a time (the model's own routing)."""
    ck = Checkpoint(path)
    fam = ck.family
    model = from_pretrained(path)
    seen: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    hooks = []
    for l in ck.moe_layers:
        ex = getattr(moe_block(decoder_layers(model, fam)[l], fam), fam.experts)

        def grab(mod: Any, args: tuple[Any, ...], _l: int = l) -> None:
            seen.setdefault(_l, []).append(tuple(a.detach() for a in args[:3]))

        def grab_scaled(mod: Any, args: tuple[Any, ...], out: Any, _l: int = l) -> None:
            """Llama-4: the expert sees the token copy times its router score; its output is added unweighted."""
            x, (scores, logits) = args[0].detach(), out
            idx = torch.topk(logits, mod.top_k, dim=1)[1]  # [T, k]
            copies = (x[:, None, :] * scores.gather(1, idx)[..., None]).reshape(-1, x.shape[-1])
            seen.setdefault(_l, []).append((copies, idx.reshape(-1, 1), torch.ones(copies.shape[0], 1)))

        if fam.scaled_input:
            router = getattr(moe_block(decoder_layers(model, fam)[l], fam), fam.router)
            hooks.append(router.register_forward_hook(grab_scaled))
        else:
            hooks.append(ex.register_forward_pre_hook(grab))
    with torch.no_grad():
        for row in input_ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    doms = sorted(set(domains))
    out = {}
    for l in ck.moe_layers:
        w = ck.moe_weights(l)
        E, I, H = w.gate.shape
        ex = getattr(moe_block(decoder_layers(model, fam)[l], fam), fam.experts)

        def expert(e: int, x: torch.Tensor, ex: Any = ex, w: Any = w) -> tuple[torch.Tensor, torch.Tensor]:
            """(h [I], f [H]) of expert e from the view, with the transformers module's own gated activation
            (its ``_apply_gate`` on [g | u]: act(g) * u unless the family overrides it, as Beam or MiniMax-M3 do)."""
            g, u = w.gate[e].float() @ x, w.up[e].float() @ x
            if getattr(ex, "has_gate", True) is False:  # gateless experts (Nemotron-H): h = act(up x)
                h = ex.act_fn(u)
                return h, w.down[e].float() @ h
            if w.gate_bias is None:
                own = getattr(ex, "_apply_gate", None)  # (Llama-4's experts predate the interface: act_fn only)
                h = own(torch.cat([g, u])) if own is not None else ex.act_fn(g) * u
                if fam.post_norm:  # MuseSpark: the experts module's own norm after each expert
                    return h, ex.post_expert_norm((w.down[e].float() @ h)[None])[0]
                return h, w.down[e].float() @ h
            g, u = g + w.gate_bias[e].float(), u + w.up_bias[e].float()
            h = ex._apply_gate(torch.stack([g, u], -1).flatten() if fam.interleaved else torch.cat([g, u]))
            return h, w.down[e].float() @ h + w.down_bias[e].float()

        tokens, mass = torch.zeros(E), torch.zeros(E, dtype=torch.float64)
        reap, sq, dom = (
            torch.zeros(E, dtype=torch.float64),
            torch.zeros(E, I, dtype=torch.float64),
            torch.zeros(len(doms), E),
        )
        for row_i, (hid, idx, wts) in enumerate(seen[l]):
            d = doms.index(domains[row_i])
            for t in range(hid.shape[0]):
                p = wts[t].double() / wts[t].double().sum()
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    h, f = expert(e, hid[t].float())
                    tokens[e] += 1
                    mass[e] += p[j]
                    reap[e] += p[j] * f.double().norm()
                    sq[e] += h.double() ** 2
                    dom[d, e] += 1
        n = tokens.clamp_min(1)
        out[l] = dict(
            tokens=tokens,
            routing_mass=mass / mass.sum(),
            reap=reap / n,
            channel_sq_mean=sq / n[:, None].double(),
            domain_counts=dom,
        )
    return out


def check_profile(ck: Checkpoint) -> None:
    tokens = calibration_set(load_tokenizer(ck.path), "mixed", samples=4, seq_len=16, seed=3)
    stats = collect(ck, tokens, batch_size=3)
    ref = brute_force(ck.path, tokens.input_ids, tokens.domains)
    T, k = tokens.num_tokens, ck.top_k
    assert sorted(stats) == ck.moe_layers
    for l in ck.moe_layers:
        s, r = stats[l], ref[l]
        assert int(s["tokens"].sum()) == k * T
        assert torch.equal(s["tokens"].double(), r["tokens"].double()), l
        assert torch.allclose(s["frequency"], r["tokens"].double() / (k * T))
        assert torch.equal(s["domain_counts"].double(), r["domain_counts"].double()), l
        for name in ("routing_mass", "reap", "channel_sq_mean"):
            assert torch.allclose(s[name].double(), r[name], rtol=1e-4, atol=1e-9), (l, name)


def _cli(*args: Any) -> None:
    from typer.testing import CliRunner

    from moecompress.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code != 0:
        import traceback

        tb = "".join(traceback.format_exception(res.exception))[-1500:] if res.exception else ""
        raise AssertionError(f"{' '.join(map(str, args[:1]))} exit {res.exit_code}: {res.output[-600:]} {tb}")


CALIB = ("--samples", "2", "--seq-len", "16", "--device", "cpu")


class Refused(Exception):
    """The operation refused this family on purpose (a one-line reason), as opposed to failing."""


GROUPS_UNVERIFIED = "routes within groups of experts"
FUSED_ON_DISK = "keeps its routed experts fused on disk"
HASH_ROUTED = "pick experts by a fixed token -> expert table"


def check_prune(ck: Checkpoint, work: Path) -> None:
    """Prune 25%: the default output-error search (refit none, so the output is the base with experts removed) where
    moecompress re-implements the family's routing (record, source or behaviour verified) and its expert math (not
    gpt-oss's biased clamped SwiGLU, refused there), else by frequency."""
    out = work / "pruned"
    search = ck.family.routing_known and not ck.family.expert_bias
    method = ("output-error", "--refit", "none") if search else ("frequency",)
    try:
        _cli("prune", ck.path, "--ratio", "0.25", "--method", *method, *CALIB, "-o", out)
    except AssertionError as err:
        if GROUPS_UNVERIFIED in str(err) and ck.family.group_key and not ck.family.groups_contiguous:
            raise Refused("group-limited routing not verified: expert removal could regroup experts") from None
        if HASH_ROUTED in str(err) and ck.family.hash_layers and not out.exists():
            raise Refused("hash-routed layers (tid2eid): expert removal would send tokens to other experts") from None
        raise
    model = reload_clean(out)
    pruned = Checkpoint(out)
    assert pruned.num_experts == ck.num_experts - round(0.25 * ck.num_experts), pruned.num_experts
    for key in ck.family.count_keys:
        assert getattr(model.config.get_text_config(), key) == pruned.num_experts, key
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(12)[None] % 300).logits).all()
    check_masked(ck, out, model)


@contextmanager
def experts_masked(model: torch.nn.Module, fam: Any, E: int, removed: dict[int, list[int]]) -> Iterator[None]:
    """The base model with ``removed`` experts (per layer) masked out of routing, through the family's own code:
    inside each router's forward, the router logits (every ``F.linear`` output of width E) are -inf for them, and a
    correction bias is -inf for them (sigmoid routers add it after the logits). E: the base model's expert count."""
    blocks = {l: moe_block(decoder_layers(model, fam)[l], fam) for l in removed}
    routers = {id(blocks[l].get_submodule(fam.router)): l for l in removed}  # Hunyuan's router: gate.wg
    active: list[int] = []
    linear = torch.nn.functional.linear
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def masked_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = linear(x, w, b)
        if active and y.shape[-1] == E:
            y = y.clone()
            y[..., removed[active[-1]]] = float("-inf")
        return y

    def enter(mod: Any, args: Any) -> None:
        active.append(routers[id(mod)])

    def leave(mod: Any, args: Any, out: Any) -> None:
        active.pop()

    hooks = []
    for l, gone in removed.items():
        router = blocks[l].get_submodule(fam.router)
        hooks += [router.register_forward_pre_hook(enter), router.register_forward_hook(leave)]
        corr = fam.correction_of(blocks[l])  # the router's (DeepSeek), the block's (MiniMax-M2), moe_statics (ERNIE)
        if corr is not None:
            saved.append((corr, corr.detach().clone()))
            with torch.no_grad():
                corr[gone] = float("-inf")
    torch.nn.functional.linear = masked_linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)


def check_masked(ck: Checkpoint, out: Path, pruned: torch.nn.Module) -> None:
    """Pruned logits == the base model with the removed experts masked out of routing (issue 12)."""
    stage = Checkpoint(out).manifest.stage("prune")
    removed = {int(l): info["removed"] for l, info in stage["layers"].items()}
    assert removed and all(removed.values()), removed
    base = from_pretrained(ck.path)
    pruned = pruned.float()
    ids = (torch.arange(2 * 24).reshape(2, 24) * 7 + 3) % 300
    with torch.no_grad():
        want = pruned(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        with experts_masked(base, ck.family, ck.num_experts, removed):
            got = base(input_ids=ids).logits
    assert not torch.allclose(plain, want, atol=1e-4), "removing experts changed nothing: the check cannot fail"
    err = float((got - want).abs().max())
    assert err < 1e-4, f"pruned logits differ from the base model with those experts masked by {err:.2e}"


def check_quantize(ck: Checkpoint, work: Path) -> None:
    out = work / "q4"
    if ck.config.model_type == "gpt_oss":  # written as MXFP4, checked at expert width 64 (blocks of 32 values)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
        from fused_layouts import mxfp4_check

        return mxfp4_check(ck, work, _cli)
    try:
        _cli("quantize", ck.path, "--bits", "4", "--plan", "uniform", "--method", "rtn", *CALIB, "-o", out)
    except AssertionError as err:
        if FUSED_ON_DISK in str(err) and ck.family.fused_disk and not out.exists():
            raise Refused(
                "experts fused on disk: per-expert quantized tensors would not load in transformers"
            ) from None
        raise
    reload_clean(out)
    if ck.family.nest or ck.family.scaled_input:  # a multimodal wrapper, Llama-4: moecompress.load reads them through
        from moecompress import load  # transformers' class (quant/load.py), with transformers' logits:

        dt = torch.float32 if ck.family.scaled_input else torch.bfloat16
        auto = model_class(AutoConfig.from_pretrained(out))
        ids = torch.arange(12)[None] % 300
        with torch.no_grad():
            a = load(out, dtype=dt)(input_ids=ids).logits.float()
            b = auto.from_pretrained(out, experts_implementation="eager", dtype=dt)(input_ids=ids).logits.float()
            if not ck.family.scaled_input:  # bf16 (transformers leaves a float32 wrapper's fused experts in bf16)
                assert torch.equal(a, b), float((a - b).abs().max())
            elif ck.family.nest is None:  # Llama-4 text: its experts as SequentialLlama4TextExperts, float32
                assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
            else:  # the Llama-4 wrapper: transformers keeps its dequantized float32 weights unrounded (q * scale in
                # float32; moecompress.load and Llama-4 text round them to the scale dtype, as compressed-tensors does)
                err = (from_pretrained(ck.path)(input_ids=ids).logits - a).abs().max()
                assert (a - b).abs().max() <= 0.1 * err, (float((a - b).abs().max()), float(err))


def _cli_or_refused(*args: Any) -> None:
    """A CLI command that passes, or exits 2 with its one-line refusal (recorded as refused, with the line)."""
    from typer.testing import CliRunner

    from moecompress.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code == 2 and res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) <= 3:
        raise Refused(" ".join(res.output.split())[len("error: ") :][:300])
    if res.exit_code != 0:
        _cli(*args)  # the same failure, with its traceback


def check_atom(ck: Checkpoint, work: Path) -> None:
    """Uniform channel pruning: the output loads in plain transformers (no missing/unexpected keys) with the logits
    moecompress.load gives; shared experts zero-padded to the narrower width (atomic/shared.py: DeepSeek-style
    ``moe_intermediate_size * n_shared_experts``) give exactly the base model's output on the same input."""
    import json

    from moecompress import load

    out = work / "atom"
    _cli_or_refused("prune", ck.path, "--granularity", "atom", "--ratio", "0.25", "--refit", "none", *CALIB, "-o", out)
    ids = torch.arange(12)[None] % 300
    pruned = reload_clean(out).float()
    with torch.no_grad():
        a, b = load(out)(input_ids=ids).logits, pruned(input_ids=ids).logits
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
        stage = next(s for s in json.loads((out / "moecompress.json").read_text())["stages"] if s["op"] == "atom")
        pad = stage.get("shared_padding")
        if not pad:
            return
        base = from_pretrained(ck.path)
        x = torch.randn(16, ck.config.hidden_size, generator=torch.Generator().manual_seed(0))
        for name in pad["modules"]:  # model.layers.<l>.<path in the layer>
            l, rest = name.split(".", 3)[2:]
            before = decoder_layers(base, ck.family)[int(l)].get_submodule(rest)
            after = decoder_layers(pruned, ck.family)[int(l)].get_submodule(rest)
            assert after.down_proj.weight.shape[1] == pad["padded_width"] > before.down_proj.weight.shape[1]
            assert torch.equal(after(x), before(x)), f"{name}: the padded shared experts' output differs"


def check_merge(ck: Checkpoint, work: Path) -> None:
    out = work / "merged"
    _cli_or_refused("merge", ck.path, "--ratio", "0.25", *CALIB, "-o", out)
    reload_clean(out)


def check_load(ck: Checkpoint, work: Path) -> None:
    """moecompress.load of the prune output gives the logits plain transformers gives."""
    from moecompress import load

    out = work / "pruned"
    ids = torch.arange(16)[None] % 300
    with torch.no_grad():
        a = load(out)(input_ids=ids).logits
        b = reload_clean(out).float()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def check_eval(ck: Checkpoint, work: Path) -> None:
    js = work / "eval.json"
    _cli(
        "eval",
        work / "pruned",
        "--base",
        ck.path,
        "--seq-len",
        "16",
        "--max-windows",
        "2",
        "--device",
        "cpu",
        "--json",
        js,
    )
    import json

    assert json.loads(js.read_text())


def check_report(ck: Checkpoint, work: Path) -> None:
    _cli("report", work / "pruned", "-o", work / "report.html", "--overwrite")
    assert (work / "report.html").stat().st_size > 1000


def run_checks(model_type: str, work: Path, tokenizer_dir: Path, ops: tuple[str, ...] = OPS) -> dict[str, Any]:
    """{"model_type", "supported": bool, "reason" | per-op "ok"/"failed: ..."}; assertion errors are recorded."""
    cfg, reason = family_or_refusal(model_type)
    if cfg is None:
        return {"model_type": model_type, "supported": False, "reason": reason}
    result: dict[str, Any] = {"model_type": model_type, "supported": True, "ops": {}}
    path = build(model_type, work / model_type, tokenizer_dir)
    ck = Checkpoint(path)
    fam = ck.family
    result |= {
        "derived": fam.derived,
        "routing_known": fam.routing_known,
        "routing_verified_by": fam.routing_verified_by,  # record | source | behaviour | None
        "moe_layers": ck.moe_layers,
        "count_keys": list(fam.count_keys),
        "shared": fam.shared,
        "nest": list(fam.nest) if fam.nest else None,
        "disk": f"{fam.disk_block}.{fam.experts}.gate_up_proj/down_proj (fused)"
        if fam.fused_disk
        else f"{fam.disk_block}.{fam.experts}.<e>.{'/'.join(fam.expert_names)}",
    }
    result["ops"]["open"] = "ok"
    steps = {
        "view_write": lambda: check_view_write(ck),
        "profile": lambda: check_profile(ck),
        "prune": lambda: check_prune(ck, work / f"{model_type}-out"),
        "quantize": lambda: check_quantize(ck, work / f"{model_type}-out"),
        "info": lambda: _cli("info", ck.path),
        "atom": lambda: check_atom(ck, work / f"{model_type}-out"),
        "merge": lambda: check_merge(ck, work / f"{model_type}-out"),
        "load": lambda: check_load(ck, work / f"{model_type}-out"),  # after prune
        "eval": lambda: check_eval(ck, work / f"{model_type}-out"),  # after prune
        "report": lambda: check_report(ck, work / f"{model_type}-out"),  # after prune
    }
    for op, fn in steps.items():
        if op not in ops:
            continue
        if op in ("load", "eval", "report") and result["ops"].get("prune", "").startswith("refused"):
            result["ops"][op] = "refused: runs on the prune output (expert pruning is refused)"
            continue
        try:
            fn()
            result["ops"][op] = "ok"
        except Refused as why:
            result["ops"][op] = f"refused: {why}"
        except Exception as err:  # recorded per op: the report says which operation fails and why
            first = (str(err).strip().splitlines() or [""])[-1][:200]
            result["ops"][op] = f"failed: {type(err).__name__}: {first}"
    return result


def disk_keys(folder: Path) -> set[str]:
    """Every tensor name in a folder's safetensors files (the names on disk, before any conversion)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys |= set(s.keys())
    return keys
