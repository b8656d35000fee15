"""The demo and the bench case: realistic token counts, and they run end to end."""

import torch

from videollava.vtr import VTRConfig, demo, load_model, load_processor
from videollava.vtr.tiny import bench_case

SMALL = dict(hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_bench_case_is_an_8_frame_224px_video_of_2056_visual_tokens(tmp_path):
    case = bench_case(SMALL, tmp_path)
    processor = load_processor(case["path"])
    inputs = case["inputs"](processor, 2)
    assert tuple(inputs["pixel_values_videos"].shape) == (2, 8, 3, 224, 224)
    model = load_model(case["path"], VTRConfig(strategy="fastv", keep_tokens=100, prune_layer=1))
    assert ((inputs["input_ids"] == model.config.video_token_id).sum(1) == 8 * 257).all()
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
        case["vision"](model, inputs)
    assert model.vtr_last.stages[0].image_tokens_before == [2056, 2056]
    assert model.vtr_last.stages[0].image_tokens_kept == [100, 100]
    assert bench_case(SMALL, tmp_path, model=case["path"])["path"] == case["path"]


def test_demo_runs_a_video_file_and_reports_tokens_kept_per_frame(tiny_path, video_files, capsys):
    argv = ["--model", tiny_path, "--video", str(video_files[1]), "--strategies", "fastv", "--budgets", "20"]
    assert demo.main([*argv, "--repeats", "1", "--max-new-tokens", "2", "--num-frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "prompt: " in out and "68 of them video tokens" in out  # 4 frames x 17
    row = next(line for line in out.splitlines() if line.startswith("fastv"))
    cells = [c.strip() for c in row.split("|")]
    per_frame = [int(n) for n in cells[6].split()]
    assert cells[2] == "20" and len(per_frame) == 4 and sum(per_frame) == 20
