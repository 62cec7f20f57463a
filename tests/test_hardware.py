from llava_jax import hardware


def test_device_kinds_map_to_chips():
    # device_kind strings as JAX reports them on each platform.
    assert hardware.chip_of("TPU v4").peak_bf16_flops == 275e12
    assert hardware.chip_of("TPU v5 lite").name == "TPU v5e"
    assert hardware.chip_of("TPU v5p").name == "TPU v5p"
    # Cloud TPU's v5p page: 95 GiB per chip (not 95e9 bytes).
    assert hardware.chip_of("TPU v5p").hbm_bytes == 95 * 2**30
    assert hardware.chip_of("TPU v6 lite").peak_bf16_flops == 918e12
    assert hardware.chip_of("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert hardware.chip_of("NVIDIA H200").hbm_bytes == 141 * 10**9
    assert hardware.chip_of("cpu") is None


def test_mfu_arithmetic():
    chip = hardware.CHIPS["v5p"]
    # 4 chips, 1 s per step, 918 TFLOP per step -> half of 4 * 459 TFLOP/s.
    assert abs(hardware.mfu(918e12, 1.0, 4, chip) - 0.5) < 1e-12
    assert hardware.mfu(1e12, 1.0, 1, None) is None
