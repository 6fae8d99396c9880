"""The training step and its fast paths, in one process: what each switch does here, and its fallbacks."""

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from pipeline.config import load_config
from pipeline.dist import DistInfo
from pipeline.errors import UserError
from pipeline.fastpaths import FastPaths, _switch, adam, compile_mode, resolve
from pipeline.step import PAIRS_COMPILE


def _trainer(shards, runs, *extra, device="cpu"):
    from pipeline.trainer import Trainer

    overrides = [f"data.shards=[{','.join(map(str, shards))}]", "data.batch_size=4", "model.ngf=16", "model.ndf=16",
                 f"train.runs_dir={runs}", "train.name=step", "train.resume=never", "log.wandb=disabled",
                 "log.tensorboard=false", *extra]
    cfg = load_config(REPO / "configs" / "sbi-smoke.yaml", overrides)
    return Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device(device)))


@pytest.fixture(scope="module")
def shards(celeba_shards, celebdf_shards):
    return [celeba_shards.out_dir, celebdf_shards.out_dir]


def test_auto_keeps_the_cpu_on_its_plain_paths_and_fused_adam_is_used():
    cfg = load_config(REPO / "configs" / "base.yaml")
    fast = resolve(cfg.train, cfg.model, torch.device("cpu"))
    assert (fast.precision, fast.channels_last, fast.compile, fast.fused_adam) == ("fp32", False, False, True)
    assert fast.graph_inputs is False and fast.compile_inputs is False
    assert cfg.train.graph_inputs == "auto" and _switch(cfg.train.graph_inputs, "graph_inputs", torch.device("cuda"))
    assert cfg.train.compile_inputs is False  # until a GPU has measured it
    assert _switch("auto", "compile_inputs", torch.device("cuda")) and not _switch("auto", "compile_inputs", torch.device("cpu"))
    opt = adam([torch.nn.Parameter(torch.zeros(3))], 1e-3, (0.5, 0.999), fast.fused_adam, "D")
    assert opt.defaults["fused"] is True


def test_channels_last_with_channel_counts_it_cannot_use_falls_back_with_one_warning(caplog):
    cfg = load_config(REPO / "configs" / "base.yaml", ["train.channels_last=true", "model.ndf=12"])
    with caplog.at_level(logging.WARNING, logger="pipeline.fastpaths"):
        fast = resolve(cfg.train, cfg.model, torch.device("cpu"))
    assert fast.channels_last is False
    (record,) = caplog.records
    assert "model.ndf 12 is not a multiple of 8" in record.message and "falling back to the contiguous layout" in record.message


def test_a_compile_mode_torch_does_not_know_is_one_sentence_and_the_graphing_modes_are_told_apart():
    cfg = load_config(REPO / "configs" / "base.yaml", ["train.compile_mode=reduce_overhead"])
    with pytest.raises(UserError, match=r"train.compile_mode is 'reduce_overhead': write auto or one of torch.compile's modes, "
                                        r"default, .*reduce-overhead"):
        resolve(cfg.train, cfg.model, torch.device("cpu"))
    graphs = {mode: FastPaths("bf16", True, True, True, mode, True).cuda_graphs
              for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}
    assert graphs == {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}
    assert not FastPaths("bf16", True, True, False, "reduce-overhead", True).cuda_graphs  # not compiled: no graphs


def test_compile_mode_auto_makes_cuda_graphs_on_one_gpu_only():
    # reduce-overhead's graphs have run on one GPU in bf16 (1.7x end to end on an H200), never under DDP, with fp16's
    # loss scaling or with SAM's second pass of D: auto must put none of those under them.
    def mode(device, distributed=False, precision="bf16", *overrides):
        return compile_mode(load_config(REPO / "configs" / "sbi.yaml", list(overrides)).train, torch.device(device),
                            distributed, precision)

    assert mode("cuda") == mode("cuda", False, "fp32") == "reduce-overhead"
    assert mode("cuda", True) == "default"
    assert mode("cuda", False, "fp16") == "default"
    assert mode("cuda", False, "bf16", "train.d_sam_rho=0.05") == "default"
    assert mode("cpu") == "default"
    assert mode("cuda", False, "bf16", "train.compile_mode=max-autotune") == "max-autotune"  # what is asked for stays
    assert mode("cuda", True, "bf16", "train.compile_mode=reduce-overhead") == "reduce-overhead"  # the trainer refuses
    cfg = load_config(REPO / "configs" / "sbi.yaml")
    assert cfg.train.compile_mode == "auto" and resolve(cfg.train, cfg.model, torch.device("cpu")).compile_mode == "default"


def test_a_gpu_whose_bfloat16_is_only_emulated_gets_fp16_under_precision_auto(caplog, monkeypatch):
    # torch.cuda.is_bf16_supported() says yes on a T4 (sm75), whose bf16 it only emulates: the fallback never fired.
    # No such GPU is lent; its answers are put in its place (the rest of resolve's CUDA checks fall back on this CPU).
    cfg = load_config(REPO / "configs" / "base.yaml", ["train.compile=false"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with caplog.at_level(logging.WARNING, logger="pipeline.fastpaths"):
        assert resolve(cfg.train, cfg.model, torch.device("cuda")).precision == "fp16"
    assert any("this GPU has no bfloat16, falling back to fp16" in r.message for r in caplog.records)


def test_graph_inputs_on_a_cpu_falls_back_with_one_warning(caplog):
    cfg = load_config(REPO / "configs" / "base.yaml", ["train.graph_inputs=true"])
    with caplog.at_level(logging.WARNING, logger="pipeline.fastpaths"):
        fast = resolve(cfg.train, cfg.model, torch.device("cpu"))
    assert fast.graph_inputs is False
    (record,) = caplog.records
    assert "train.graph_inputs: CUDA graphs need a CUDA device" in record.message and "falling back to eager" in record.message


@pytest.mark.gpu
def test_graphed_self_blends_equal_eager_ones_and_draw_fresh_numbers_each_replay():
    from pipeline.graphs import GraphedFunction
    from pipeline.sbi import degrade, self_blend, template_batch

    gen = torch.Generator(device="cuda").manual_seed(0)
    images, landmarks = template_batch(64, 16, gen)

    def blends(images, landmarks):
        pairs = self_blend(images, landmarks, gen)
        return pairs.fake, degrade(pairs.real, gen), pairs.valid

    graphed = GraphedFunction(blends, gen, eager_calls=1)
    graphed(images, landmarks)
    assert graphed.graph is None  # still eager
    before = gen.get_state()
    replayed = [t.clone() for t in graphed(images, landmarks)]  # captured, then replayed
    assert graphed.graph is not None
    after = gen.get_state()
    gen.set_state(before)
    eager = blends(images, landmarks)
    assert torch.equal(gen.get_state(), after)  # a replay advances the generator as an eager call does
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b)
    again = graphed(images, landmarks)
    assert not torch.equal(again[0], replayed[0])  # each replay draws fresh numbers
    short = graphed(images[:8], landmarks[:8])  # another shape runs eagerly
    assert short[0].shape[0] == 8 and short[0].data_ptr() != again[0].data_ptr()


def _inputs_both_ways(cfg, device: torch.device, calls: int, backend: str | None = None):
    """The step's inputs from the config's fast paths after `calls` calls, and eager ones from the same generator
    state: [(fast, eager)] for real, blend and valid. `backend`: torch.compile's for the self-blends, not inductor."""
    from pipeline.data import Batch
    from pipeline.sbi import template_batch
    from pipeline.step import GANStep

    fast = resolve(cfg.train, cfg.model, device)
    gen = torch.Generator(device=device).manual_seed(0)
    images, landmarks = template_batch(cfg.data.image_size, cfg.data.batch_size, gen)
    landmarks[1] = float("nan")  # one face without usable landmarks: its blend is its real
    batch = Batch(images.contiguous(memory_format=fast.layout), landmarks=landmarks)
    step = GANStep(cfg, fast, device, gen)
    if backend:
        step._pairs = torch.compile(step._pairs_eager, backend=backend, **PAIRS_COMPILE)
    eager = GANStep(cfg, dataclasses.replace(fast, compile_inputs=False, graph_inputs=False), device, gen)
    for _ in range(calls):
        step.make_inputs(batch)
    state = gen.get_state()
    got = step.make_inputs(batch)
    got = [t.clone() for t in (got.real, got.blend, got.valid)]  # a graph's outputs are overwritten by its next replay
    gen.set_state(state)
    want = eager.make_inputs(batch)
    return list(zip(got, (want.real, want.blend, want.valid)))


def _assert_nearly_equal(pairs, flipped: float = 1e-3, worst_image: float = 1e-3) -> None:
    """Equal to float precision but for the rare value where a rounding flips the mask's erosion or a JPEG
    coefficient: at most a share `flipped` of values off by over 1e-3, no image off by `worst_image` on average, and
    the batch by under 1e-4 (TF32 products moved it by 3-6e-4, 2-7% of values; a wrong draw moves a whole image)."""
    for name, (got, want) in zip(("real", "blend"), pairs[:2]):
        diff = (got.float() - want.float()).abs()
        share, image = (diff > 1e-3).float().mean(), diff.flatten(1).mean(1).max()
        assert diff.mean() < 1e-4 and share < flipped and image < worst_image, (name, diff.mean(), share, image, diff.max())
    assert torch.equal(*pairs[2])


def test_the_self_blends_compile_whole_and_once_and_equal_eager_ones(monkeypatch):
    """What torch.compile must make of them, whatever its backend: one graph (a generator draw or a host read would
    break it), compiled once (a first trace that makes the JPEG tables guards on their empty cache), the same values.
    Inductor's own kernels take two minutes to build on two cores: the gpu test below runs them; here AOT autograd's
    eager backend runs the traced graph."""
    from pipeline import sbi

    monkeypatch.setattr(sbi, "_JPEG_CONSTANTS", {})  # as in a fresh process
    cfg = load_config(REPO / "configs" / "sbi.yaml", ["data.batch_size=4", "data.image_size=64", "model.ngf=8",
                                                      "model.ndf=8", "train.compile_inputs=true", "train.degrade_prob=1"])
    fast = resolve(cfg.train, cfg.model, torch.device("cpu"))
    assert fast.compile_inputs
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _assert_nearly_equal(_inputs_both_ways(cfg, torch.device("cpu"), calls=1, backend="aot_eager"))


@pytest.mark.gpu
def test_compiled_and_graphed_self_blends_are_the_eager_ones():
    cfg = load_config(REPO / "configs" / "sbi.yaml", ["data.batch_size=32", "data.image_size=64", "train.compile_inputs=auto"])
    fast = resolve(cfg.train, cfg.model, torch.device("cuda"))
    assert fast.compile_inputs and fast.graph_inputs
    # Triton's kernels round apart from ATen's where inductor's CPU kernels equal eager ones to 1.3e-6: on an H200,
    # every product in float32, 0.44% of the blends' values moved by over 1e-3 (at most 0.02), 3.2e-5 on average.
    # One JPEG chroma coefficient rounded the other way moves a 16x16 patch and its bilinear rim in three channels,
    # 0.25% of this batch, so the CPU's bounds would fail on one; a wrong draw still moves a whole image by far more.
    _assert_nearly_equal(_inputs_both_ways(cfg, torch.device("cuda"), calls=5),  # compiled, captured, then replayed
                         flipped=1e-2, worst_image=5e-3)


@pytest.mark.gpu
def test_a_function_that_cannot_be_captured_stops_the_run_naming_the_switch():
    # In a process of its own: a failed capture leaves the default CUDA generator unusable.
    code = (
        "import torch\n"
        "from pipeline.graphs import GraphedFunction\n"
        "graphed = GraphedFunction(lambda x: (x * float(x.sum()),), torch.Generator(device='cuda'), eager_calls=1)\n"
        "x = torch.ones(4, device='cuda')\n"
        "assert torch.equal(graphed(x)[0], x * 4)\n"
        "graphed(x)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "train.graph_inputs: the self-blends could not be captured in a CUDA graph" in result.stderr
    assert "set train.graph_inputs=false" in result.stderr


def test_fused_adam_where_it_cannot_run_falls_back_to_foreach_adam_with_one_warning(caplog):
    # Fused Adam takes real floating-point parameters only: a complex one is a real case it refuses.
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with caplog.at_level(logging.WARNING, logger="pipeline.fastpaths"):
        opt = adam([p], 0.1, (0.5, 0.999), True, "G")
    assert not opt.defaults["fused"] and opt.defaults["foreach"]
    (record,) = caplog.records
    assert "train.fused_adam" in record.message and "falling back to foreach Adam" in record.message
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3, dtype=torch.complex64))


def test_compile_without_a_working_compiler_falls_back_to_eager_mode(shards, tmp_path):
    # Inductor compiles CPU kernels with the C++ compiler that CXX names: a missing one is a real failure.
    script = (
        "import logging, sys, torch\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout)\n"
        "from pipeline.config import load_config\nfrom pipeline.fastpaths import resolve\n"
        "cfg = load_config('configs/base.yaml', ['train.compile=true', 'train.compile_inputs=true'])\n"
        "fast = resolve(cfg.train, cfg.model, torch.device('cpu'))\n"
        "print('compile', fast.compile, fast.compile_inputs)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("train.compile and train.compile_inputs: torch.compile does not work here" in result.stdout
            and "falling back to eager mode" in result.stdout)
    assert "compile False False" in result.stdout


@pytest.mark.slow
def test_compiled_g_and_d_train_on_the_cpu(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "train.compile=true")
    try:
        assert trainer.fast.compile
        batches = iter(trainer.loader)
        for _ in range(2):
            stats = trainer.train_step(next(batches))
        assert torch.isfinite(stats["loss/D"]) and torch.isfinite(stats["loss/G"])
    finally:
        trainer.close()


def test_g_step_computes_no_gradients_for_ds_weights(shards, tmp_path):
    trainer = _trainer(shards, tmp_path)
    try:
        calls = []
        for p in trainer.step_fn.D_raw.parameters():
            p.register_hook(lambda grad: calls.append(1))
        trainer.train_step(next(iter(trainer.loader)))
        assert len(calls) == len(list(trainer.step_fn.D_raw.parameters()))  # D's own step only, not G's
        assert all(p.requires_grad for p in trainer.step_fn.D_raw.parameters())
    finally:
        trainer.close()


@pytest.mark.parametrize("extra, own", [((), True), (("model.d_gan_head=shared",), False), (("train.gan_weight=0",), False),
                                         (("train.sbi_weight=0",), False)])
def test_d_has_its_own_gan_logit_only_where_it_learns_both_tasks(shards, tmp_path, extra, own):
    trainer = _trainer(shards, tmp_path, *extra)
    try:
        assert (trainer.step_fn.D_raw.gan_head is not None) == own
        trainer.train_step(next(iter(trainer.loader)))
    finally:
        trainer.close()


def test_gs_samples_never_move_the_detectors_layers(shards, tmp_path):
    # Two trainers alike but for G's weights: after D's update, the layers the detector uses are the same.
    trainers = [_trainer(shards, tmp_path / name) for name in ("a", "b")]
    try:
        with torch.no_grad():
            for p in trainers[1].step_fn.G_raw.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        batch = next(iter(trainers[0].loader))
        for trainer in trainers:
            trainer.train_step(batch)
        a, b = (t.step_fn.D_raw for t in trainers)
        assert all(torch.equal(p, q) for p, q in zip(a.main.parameters(), b.main.parameters()))
        assert not torch.equal(a.gan_head.weight, b.gan_head.weight)  # the GAN's own head did see the samples
    finally:
        for trainer in trainers:
            trainer.close()



@pytest.mark.parametrize("extra", [(), ("train.gan_weight=0",), ("model.d_norm=batch",)])
def test_the_detector_is_the_average_of_ds_weights_with_g_or_without(shards, tmp_path, extra):
    trainer = _trainer(shards, tmp_path, "train.d_ema_beta=0.05", *extra)  # below the warm-up's 0.1 from the start
    step = trainer.step_fn
    try:
        assert step.detector is step.D_ema and not step.D_ema.training
        expected = [p.detach().clone() for p in step.D_raw.parameters()]
        statistics = [b.clone() for b in step.D_raw.buffers()]  # BatchNorm's, with model.d_norm=batch
        batches = iter(trainer.loader)
        for k in range(3):
            trainer.train_step(next(batches))
            beta = min(0.05, (1 + k) / (10 + k))
            expected = [e.lerp(p.detach(), 1 - beta) for e, p in zip(expected, step.D_raw.parameters())]
            statistics = [s.lerp(b, 1 - beta) if b.is_floating_point() else b.clone()
                          for s, b in zip(statistics, step.D_raw.buffers())]
        assert all(torch.allclose(e, p, atol=1e-7) for e, p in zip(expected, step.D_ema.parameters()))
        assert len(statistics) == (9 if "model.d_norm=batch" in extra else 0)  # mean, variance and count of 3 norms
        assert all(torch.allclose(s, b, atol=1e-7) for s, b in zip(statistics, step.D_ema.buffers()))
        assert not all(torch.equal(p, q) for p, q in zip(step.D_raw.parameters(), step.D_ema.parameters()))
        state = step.state_dict()
        assert all(torch.equal(v, state["D_ema"][k]) for k, v in step.D_ema.state_dict().items())
        del state["D_ema"]  # an older checkpoint: the average starts from D
        step.load_state_dict(state)
        assert all(torch.equal(p, q) for p, q in zip(step.D_raw.parameters(), step.D_ema.parameters()))
    finally:
        trainer.close()


def test_without_an_average_the_detector_is_d_itself(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "train.d_ema_beta=0")
    try:
        trainer.train_step(next(iter(trainer.loader)))
        assert trainer.step_fn.D_ema is None and trainer.step_fn.detector is trainer.step_fn.D_raw
        assert "D_ema" not in trainer.step_fn.state_dict()
    finally:
        trainer.close()


def test_calibration_and_evaluation_score_with_the_detector_whatever_d_holds(shards, celebdf_shards, tmp_path):
    from pipeline.periodic import evaluate_detector

    trainer = _trainer(shards, tmp_path, f"train.eval_shards={celebdf_shards.out_dir}", "train.eval_split=test")
    try:
        trainer.train_step(next(iter(trainer.loader)))
        runs = []
        for zeroed in (False, True):
            if zeroed:  # D's own weights now say nothing; the detector's are untouched
                with torch.no_grad():
                    for p in trainer.step_fn.D_raw.parameters():
                        p.zero_()
            trainer.validate()
            scalars = evaluate_detector(trainer.step_fn, trainer.cfg, 0, 1, trainer.threshold)
            runs.append((dict(trainer.calibration.info), trainer.threshold, scalars))
        assert runs[0] == runs[1]
        assert runs[0][0]["auc"] != 0.5  # a zeroed D would score every face alike: AUC 0.5
    finally:
        trainer.close()


def test_one_forward_of_reals_fakes_and_blends_scores_as_three(shards, tmp_path):
    trainer = _trainer(shards, tmp_path)
    try:
        step = trainer.step_fn
        x = step.make_inputs(next(iter(trainer.loader)))
        fake = step.G_raw(torch.randn(4, 100, 1, 1))
        with torch.no_grad():
            together = step._score([x.real, fake, x.blend])
            step.one_forward = False
            apart = step._score([x.real, fake, x.blend])
        for a, b in zip(together, apart):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    finally:
        trainer.close()


@pytest.mark.gpu
@pytest.mark.parametrize("graph_inputs, compile_inputs, mode", [
    (True, False, "reduce-overhead"),  # the default on one GPU
    (True, False, "default"),  # the default under DDP
    (False, False, "default"), (True, True, "default")])
def test_steady_state_steps_never_wait_for_the_host(graph_inputs, compile_inputs, mode):
    from pipeline.data import Batch
    from pipeline.sbi import template_batch
    from pipeline.step import GANStep

    overrides = ["data.batch_size=32", "data.image_size=64", f"train.graph_inputs={graph_inputs}",
                 f"train.compile_inputs={compile_inputs}", f"train.compile_mode={mode}"]
    cfg = load_config(REPO / "configs" / "sbi.yaml", overrides)
    device = torch.device("cuda")
    fast = resolve(cfg.train, cfg.model, device)
    assert (fast.precision, fast.channels_last, fast.fused_adam, fast.tf32) == ("bf16", True, True, True)
    assert fast.graph_inputs is graph_inputs and fast.compile_inputs is compile_inputs and fast.compile_mode == mode
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    gen = torch.Generator(device=device).manual_seed(0)
    images, landmarks = template_batch(64, 32, gen)
    batch = Batch(images.contiguous(memory_format=torch.channels_last), landmarks=landmarks)
    step = GANStep(cfg, fast, device, gen)
    for i in range(4):  # warm-up: compilation, allocation, kernel choice and the capture may sync the first times
        step(batch, i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4, 9):
            stats = step(batch, i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats["loss/D"]) and step.skipped().item() == 0


def test_each_step_marks_where_it_begins_where_g_and_d_are_cuda_graphs(shards, tmp_path, monkeypatch):
    # The mark is what lets a step's compiled calls share one generation of CUDA graphs (see the gpu test below);
    # counted here on the CPU, where no graph is made.
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = _trainer(shards, tmp_path)
    try:
        batch = next(iter(trainer.loader))
        trainer.step_fn(batch, 0)
        assert marks == []  # no graphs, no marks
        trainer.step_fn.cuda_graphs = True
        trainer.step_fn(batch, 1)
        trainer.step_fn(batch, 2)
        assert marks == [1, 1]
    finally:
        trainer.close()


def test_a_cuda_graph_mode_under_ddp_is_refused_in_one_sentence(shards, tmp_path):
    from pipeline.trainer import Trainer

    cfg = load_config(REPO / "configs" / "sbi-smoke.yaml", [f"data.shards=[{','.join(map(str, shards))}]",
                                                            f"train.runs_dir={tmp_path}", "train.compile=true",
                                                            "train.compile_mode=reduce-overhead"])
    with pytest.raises(UserError, match="train.compile_mode reduce-overhead replays CUDA graphs, which have run on one "
                                        "GPU only, never under DDP: set train.compile_mode=default"):
        Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu")))


def test_the_trainer_of_one_of_several_ranks_gets_the_fast_paths_of_ddp(monkeypatch):
    # train.compile_mode auto gives reduce-overhead to a GPU run of one process only: the trainer must say it is not.
    import inspect

    from pipeline import trainer as trainer_module

    class Seen(Exception):
        pass

    def resolve_and_stop(*args, **kwargs):
        bound = inspect.signature(resolve).bind(*args, **kwargs)
        bound.apply_defaults()
        raise Seen(bound.arguments["distributed"])

    monkeypatch.setattr(trainer_module, "resolve", resolve_and_stop)
    cfg = load_config(REPO / "configs" / "sbi-smoke.yaml", ["train.compile=false"])
    for world_size in (1, 2):
        with pytest.raises(Seen) as seen:
            trainer_module.Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu")))
        assert seen.value.args[0] is (world_size > 1)


@pytest.mark.gpu
def test_reduce_overhead_steps_equal_default_ones():
    # Under reduce-overhead, D_for_G's call after D's backward started a new generation of CUDA graphs that freed G's
    # samples ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run", on an H200)
    # until each step marked where it begins.
    from pipeline.data import Batch
    from pipeline.sbi import template_batch
    from pipeline.step import GANStep

    device = torch.device("cuda")
    runs = {}
    for mode in ("default", "reduce-overhead"):
        cfg = load_config(REPO / "configs" / "sbi.yaml", ["data.batch_size=32", "data.image_size=64",
                                                          f"train.compile_mode={mode}"])
        fast = resolve(cfg.train, cfg.model, device)
        gen = torch.Generator(device=device).manual_seed(0)
        images, landmarks = template_batch(64, 32, gen)
        batch = Batch(images.contiguous(memory_format=fast.layout), landmarks=landmarks)
        step = GANStep(cfg, fast, device, gen)
        assert step.cuda_graphs is (mode == "reduce-overhead")
        runs[mode] = [step(batch, i) for i in range(5)]
    for key in ("loss/D", "loss/G"):  # the whole sequences in the message: at which step they part says more
        default, graphed = (torch.stack([stats[key] for stats in runs[mode]]) for mode in ("default", "reduce-overhead"))
        torch.testing.assert_close(graphed, default, rtol=1e-2, atol=1e-2,
                                   msg=lambda m: f"{key} by step, default {default.tolist()}, reduce-overhead "
                                                 f"{graphed.tolist()}: {m}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_steady_state_steps_read_no_device_value_on_the_host(precision):
    """The CPU twin of the gpu test above (tests/host_reads.py): between logging boundaries no step, its
    self-blends, its skip of non-finite steps or fp16's loss scaling reads a device value on the host."""
    from host_reads import HostReads

    step, batch = _lone_step("model.ngf=16", f"train.precision={precision}", config="sbi.yaml")
    for i in range(2):
        step(batch, i)
    with HostReads() as reads:
        for i in range(2, 4):
            stats = step(batch, i)
    assert reads.reads == []
    assert torch.isfinite(stats["loss/D"])


def _lone_step(*extra, config="sbi-only.yaml"):
    """A GANStep on the CPU at 64 px, batch 8, ndf 16, and a batch of template faces."""
    from pipeline.data import Batch
    from pipeline.sbi import template_batch
    from pipeline.step import GANStep

    cfg = load_config(REPO / "configs" / config, ["data.batch_size=8", "data.image_size=64", "model.ndf=16", *extra])
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    images, landmarks = template_batch(64, 8, gen)
    return GANStep(cfg, resolve(cfg.train, cfg.model, device), device, gen), Batch(images, landmarks=landmarks)


def test_the_self_blends_are_made_with_float32_products_and_tf32_is_back_after(monkeypatch, tf32_on):
    # TF32 rounds a product's inputs to 10 bits: the blend mask's threshold and the JPEG quantizer turn that into
    # flipped pixels, so the blends would differ from the CPU's and between kernels that round alike in float32.
    from pipeline import step as step_module

    seen = []

    def blend_with(*args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real_blend_with(*args)

    real_blend_with = step_module.blend_with
    monkeypatch.setattr(step_module, "blend_with", blend_with)
    step, batch = _lone_step()
    step.make_inputs(batch)
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32


def test_sam_steps_d_by_its_gradient_at_the_weights_moved_along_the_first_one():
    rho = 0.5
    sam, batch = _lone_step(f"train.d_sam_rho={rho}")
    ref, _ = _lone_step()  # the same weights and random numbers; SAM done by hand below
    inputs = ref.make_inputs(batch)
    parts = [inputs.real, inputs.blend]
    params = list(ref.D_raw.parameters())
    first = torch.autograd.grad(ref._loss_D(parts, inputs.valid)[0], params)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in first]))
    with torch.no_grad():
        for p, g in zip(params, first):
            p.add_(g * rho / norm)
    second = torch.autograd.grad(ref._loss_D(parts, inputs.valid)[0], params)
    before = [p.detach().clone() for p in sam.D_raw.parameters()]
    sam(batch, 0)
    # Adam's first update is lr * m / (sqrt(v) + eps) with m = g and v = g^2 after bias correction.
    lr, eps = sam.opt_D.param_groups[0]["lr"], sam.opt_D.param_groups[0]["eps"]
    for w, g, p in zip(before, second, sam.D_raw.parameters()):
        torch.testing.assert_close(p.detach(), w - lr * g / (g.abs() + eps), atol=1e-5, rtol=0)  # 1% of a step


def test_a_non_finite_gradient_under_sam_moves_no_weight_and_the_step_is_skipped():
    step, batch = _lone_step("train.d_sam_rho=0.05")
    batch.images[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in step.D_raw.parameters()]
    step(batch, 0)
    assert all(torch.equal(w, p) for w, p in zip(before, step.D_raw.parameters()))
    assert step.skipped().item() == 1


def test_a_loss_non_finite_only_at_sams_moved_weights_counts_as_a_skipped_step():
    # fp16 counts a skipped step only where a loss is non-finite (its loss scale overflows now and then by design):
    # the loss at the moved weights must be one of those it checks, or a rho too large would never stop the run.
    step, batch = _lone_step("train.d_sam_rho=1e30", "train.precision=fp16")
    before = [p.detach().clone() for p in step.D_raw.parameters()]
    stats = step(batch, 0)
    assert torch.isfinite(stats["loss/D"])  # at D's own weights all is well
    assert step.in_row.item() == 1
    assert all(torch.equal(w, p) for w, p in zip(before, step.D_raw.parameters()))
