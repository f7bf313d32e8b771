"""learner.dtype=auto and rollout.dtype=auto: bf16 only where the hardware computes it natively."""

from rlkd.hardware import cpu_bf16_flags, resolve_learner_dtype, resolve_rollout_dtype

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_flags_are_read_from_the_flags_line():
    assert cpu_bf16_flags(AVX2) == []
    assert cpu_bf16_flags(SAPPHIRE) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags("model name\t: avx512_bf16 in a name\n") == []


def test_auto_picks_by_hardware_and_explicit_values_win():
    assert resolve_learner_dtype("auto", cuda=False, cpuinfo=AVX2)[0] == "float32"
    assert resolve_learner_dtype("auto", cuda=False, cpuinfo=SAPPHIRE)[0] == "autocast_bf16"
    assert resolve_learner_dtype("auto", cuda=True, cpuinfo=AVX2)[0] == "autocast_bf16"
    assert resolve_learner_dtype("float32", cuda=True, cpuinfo=SAPPHIRE)[0] == "float32"
    assert "avx512_bf16" in resolve_learner_dtype("auto", cuda=False, cpuinfo=SAPPHIRE)[1]


def test_rollout_auto_picks_bf16_where_vllm_computes_it_natively():
    assert resolve_rollout_dtype("auto", gpu=False, cpuinfo=AVX2)[0] == "float32"
    assert resolve_rollout_dtype("auto", gpu=False, cpuinfo=SAPPHIRE)[0] == "bfloat16"
    assert resolve_rollout_dtype("auto", gpu=True, cpuinfo=AVX2)[0] == "bfloat16"
    assert resolve_rollout_dtype("float32", gpu=True, cpuinfo=SAPPHIRE) == ("float32", "set by rollout.dtype")
    assert "amx_bf16" in resolve_rollout_dtype("auto", gpu=False, cpuinfo=SAPPHIRE)[1]
