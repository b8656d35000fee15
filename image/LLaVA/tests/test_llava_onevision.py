"""LLaVA-OneVision (and LLaVA-Video) on the shared engine: what is particular to it beyond the contract suite
(test_contract.py): loading, the token layout the facts describe (anyres_max tiles with row newlines, pooled
video frames, several images), the SigLIP facts without a CLS token, video-only prompts, beams and defaults, and
the `frames` fact in each LLaVA-NeXT video layout."""

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from llava.vtr import (
    BACKBONES,
    PruningStrategy,
    VTRConfig,
    VTRLlavaOnevisionForConditionalGeneration,
    load_model,
    load_processor,
    register_strategy,
    wrap,
)
from llava.vtr.modeling import NEWLINE_POSITIONS
from llava.vtr.tiny import build_tiny_llava_onevision, demo_image, demo_video
from llava_testlib import ov_chat, ov_videos

SEEN = {}


@register_strategy("test_ov_facts")
class Facts(PruningStrategy):
    """Records the facts each sample's first stage sees, then keeps the first tokens."""

    needs_attention = False

    def compute_scores(self, attention, image_token_range, config, **ctx):
        SEEN[ctx["batch_index"]] = {
            "grid": ctx["visual_grid"](),
            "importance": ctx["vision_importance"](),
            "features": ctx["vision_features"](),
            "layer": ctx["vision_layer"](),
            "frames": ctx["frames"](),
            "patch_grid": ctx["patch_grid"],
            "tower": ctx["vision_tower"],
        }
        n = image_token_range[1] - image_token_range[0]
        return -torch.arange(n, dtype=torch.float32)


def facts_of(path, inputs):
    SEEN.clear()
    model = load_model(
        path, VTRConfig(strategy="test_ov_facts", keep_ratio=1.0, prune_layer=0), attn_implementation="sdpa"
    )
    with torch.no_grad():
        model(**inputs)
    return dict(SEEN)


def grid_rows(group, rows, cols, newline=True):
    """(group, row, col) of a rows x cols grid in row order, a newline (-1, -1, -1) closing each row if asked."""
    out = []
    for r in range(rows):
        out += [(group, r, c) for c in range(cols)] + ([(-1, -1, -1)] if newline else [])
    return out


def test_checkpoints_load_as_the_onevision_class_with_stock_weights(ov_path, ov_stock):
    model = load_model(ov_path)
    assert type(model) is VTRLlavaOnevisionForConditionalGeneration
    assert type(wrap(LlavaOnevisionForConditionalGeneration.from_pretrained(ov_path))) is type(model)
    for (name, p), (stock_name, q) in zip(model.state_dict().items(), ov_stock["sdpa"].state_dict().items()):
        assert name == stock_name and torch.equal(p, q), name
    assert "LLaVA-OneVision" in BACKBONES


def test_the_visual_grid_follows_the_stock_token_layout(ov_path, ov_batch):
    """Sample 0: a square image (base view 4 x 4; its 2 x 2 tiles, 8 x 8 features, shrunk to 5 x 5 by anyres_max_2,
    a newline per row), then a 4-frame video (2 x 2 pooled frames, one newline). Sample 1: a 96 x 40 image (1 x 2
    tiles: 4 x 8 features, nothing to unpad at this size), then its video."""
    seen = facts_of(ov_path, ov_batch)
    video = [cell for f in range(4) for cell in grid_rows(f, 2, 2, newline=False)] + [(-1, -1, -1)]

    def shifted(cells, by):
        return [(g + by if g >= 0 else g, r, c) for g, r, c in cells]

    square = grid_rows(0, 4, 4, newline=False) + grid_rows(1, 5, 5)
    wide = grid_rows(0, 4, 4, newline=False) + grid_rows(1, 4, 8)
    assert [tuple(x) for x in seen[0]["grid"].tolist()] == square + shifted(video, 2)
    assert [tuple(x) for x in seen[1]["grid"].tolist()] == wide + shifted(video, 2)
    assert seen[0]["patch_grid"] == (4, 4) and seen[0]["tower"] == {"depth": 2, "cls": False}


def test_siglip_facts_are_the_received_attention_and_the_features_the_projector_reads(ov_path, ov_stock, ov_batch):
    """No CLS query: vision_importance (and vision_layer()'s `received`) is the attention a patch receives in the
    last tower layer, mean over heads and queries, taken from the eager tower's own attention maps; the base view
    carries it as it is, a video frame pooled 2 x 2 (bilinear); newlines get 0."""
    seen = facts_of(ov_path, ov_batch)
    stock = ov_stock["eager"].model
    with torch.no_grad():
        pixels = ov_batch["pixel_values"][:, 0]  # each image's base view
        views = stock.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        frames = stock.vision_tower(ov_batch["pixel_values_videos"].flatten(0, 1), output_attentions=True)
    received = views.attentions[-1].mean(1).mean(1)  # [images, 16]
    per_frame = frames.attentions[-1].mean(1).mean(1).reshape(-1, 1, 4, 4)
    pooled = torch.nn.functional.interpolate(per_frame, size=(2, 2), mode="bilinear").reshape(2, -1)
    for b in range(2):
        got, grid = seen[b]["importance"], seen[b]["grid"]
        torch.testing.assert_close(got[:16], received[b], atol=1e-5, rtol=0)
        torch.testing.assert_close(seen[b]["layer"]["received"], got, atol=0, rtol=0)
        assert seen[b]["layer"]["cls"] is None
        torch.testing.assert_close(got[-17:-1], pooled[b], atol=1e-5, rtol=0)  # its 4 frames, 2 x 2 each
        assert torch.all(got[grid[:, 0] < 0] == 0)
        torch.testing.assert_close(seen[b]["features"][:16], views.hidden_states[-1][b], atol=1e-5, rtol=0)


def test_several_images_in_one_sample_get_their_base_views_only(ov_path, ov_processor, ov_stock):
    """As the stock model encodes them: no tiles, each base view closed by a newline."""
    text = ov_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}],
        add_generation_prompt=True,
    )
    inputs = ov_processor(text=text, images=[[demo_image(64), demo_image(64).resize((96, 40))]], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2]
    seen = facts_of(ov_path, inputs)
    want = [*grid_rows(0, 4, 4, newline=False), (-1, -1, -1), *grid_rows(1, 4, 4, newline=False), (-1, -1, -1)]
    assert [tuple(x) for x in seen[0]["grid"].tolist()] == want
    model = load_model(ov_path, VTRConfig(strategy="fastervlm", keep_tokens=6), attn_implementation="sdpa")
    with torch.no_grad():
        got = model(**inputs).logits
    assert model.vtr_last.stages[0].image_tokens_kept == [6]
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert visual == 2 * (16 + 1) and got.shape[1] == inputs["input_ids"].shape[1] - visual + 6  # the rows kept


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "visionzip"])
def test_a_video_only_prompt_prunes_and_generates_with_beams(ov_path, ov_processor, method):
    text = ov_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
        add_generation_prompt=True,
    )
    inputs = ov_processor(text=text, videos=[demo_video(6, 64)], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[1] == 6
    model = load_model(ov_path, VTRConfig(strategy=method, keep_tokens=10), attn_implementation="sdpa")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    stage = model.vtr_last.stages[0]
    assert [k + m for k, m in zip(stage.image_tokens_kept, stage.merged or [0, 0])] == [10, 10]
    assert out.shape[0] == 2
    assert stage.image_tokens_before == [6 * 4 + 1] * 2


def test_the_default_budget_is_a_quarter_of_a_32_frame_video(ov_path):
    model = load_model(ov_path, VTRConfig())
    assert model.vtr_config.keep_tokens == 32 * 14 * 14 // 4


def test_pre_encoded_images_without_their_sizes_are_refused_by_name(ov_path, ov_batch):
    model = load_model(ov_path, VTRConfig(strategy="fastervlm", keep_tokens=8), attn_implementation="sdpa")
    no_sizes = {k: v for k, v in ov_batch.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        model(**no_sizes)


# ---------------------------------------------------------------- LLaVA-Video's video layout


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    """LLaVA-Video's layout on 40 px views (5 x 5 patches): frames average-pooled to 2 x 2 (bilinear would give
    3 x 3), a newline after every pooled row."""
    return str(
        build_tiny_llava_onevision(
            tmp_path_factory.mktemp("tiny-llava-video"),
            image_size=40,
            grid_pinpoints=((40, 80), (80, 40), (80, 80)),
            newline_position="grid",
            pool_mode="average",
        )
    )


def llava_video_embed(stock, inputs):
    """LLaVA-Video's merged embeddings written out literally: the stock image features; each frame through the tower
    (its last hidden state) and the projector, average-pooled 2 x 2, an `image_newline` after each pooled row."""
    model, cfg = stock.model, stock.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if inputs.get("pixel_values") is not None:
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output
        embeds = embeds.masked_scatter((ids == cfg.image_token_id)[..., None], torch.cat(feats))
    videos = inputs["pixel_values_videos"]
    hidden = model.vision_tower(videos.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
    frames = model.multi_modal_projector(hidden)  # [videos * frames, 25, width]
    width = frames.shape[-1]
    grid = frames.view(-1, 5, 5, width).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1)  # [videos * frames, 2, 2, width]
    rows = torch.cat([pooled, model.image_newline.expand(pooled.shape[0], 2, 1, width)], dim=2)
    return embeds.masked_scatter((ids == cfg.video_token_id)[..., None], rows.reshape(-1, width))


def test_llava_video_layout_tokens_and_facts(video_path):
    """The processor expands a 4-frame video into 4 x 2 x (2 + 1) tokens; the visual grid is each frame's 2 x 2 rows
    each closed by a newline; unpruned logits equal the literal LLaVA-Video embedding run through the layers."""
    from vtr_oracle import oracle_forward

    processor = load_processor(video_path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=text, videos=[demo_video(4, 80)], return_tensors="pt")
    model = load_model(video_path, VTRConfig(enabled=False), attn_implementation="eager")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 4 * 2 * 3
    seen = facts_of(video_path, inputs)
    want = [cell for f in range(4) for cell in grid_rows(f, 2, 2)]
    assert [tuple(x) for x in seen[0]["grid"].tolist()] == want
    with torch.no_grad():
        got = model(**inputs).logits
    want_logits = oracle_forward(model, inputs, [], inputs["input_ids"].shape[1], llava_video_embed)
    torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "dart"])
def test_llava_video_layout_prunes_as_the_oracle(video_path, method):
    """A pruned prefill and greedy decode on LLaVA-Video's layout equal the masking oracle over the literal embedding."""
    from vtr_oracle import oracle_forward, oracle_greedy, stage_drops

    processor = load_processor(video_path)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in ("What moves?", "Describe the video in detail. Is there a car?")
    ]
    videos = [demo_video(4, 80), demo_video(4, 80)[::-1].copy()]
    images = [demo_image(80), demo_image(80).resize((120, 50))]
    inputs = processor(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)
    stock = load_model(video_path, VTRConfig(enabled=False), attn_implementation="eager")
    model = load_model(
        video_path, VTRConfig(strategy=method, keep_tokens=16, prune_layer=0 if method == "fastervlm" else 2)
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    record, prompt_len = model.vtr_last, inputs["input_ids"].shape[1]
    visual = torch.isin(inputs["input_ids"], torch.tensor([stock.config.image_token_id, stock.config.video_token_id]))
    drops = stage_drops(record, 2, prompt_len, visual)
    expected = oracle_forward(stock, inputs, drops, prompt_len, llava_video_embed, conventions=model.vtr_conventions())
    for b in range(2):
        rows = (record.kept_index[b] >= 0) & inputs["attention_mask"][b].bool()[record.kept_index[b].clamp_min(0)]
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=1e-5, rtol=0)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    stages = stage_drops(model.vtr_last, 2, prompt_len, visual)
    want, _ = oracle_greedy(stock, inputs, stages, 3, llava_video_embed, model.vtr_conventions())
    assert torch.equal(out[:, prompt_len:], want)


def test_an_unknown_video_layout_is_refused_by_name():
    from llava.vtr.tiny import build_tokenizer, tiny_onevision_config

    config = tiny_onevision_config(build_tokenizer(chatml=True), newline_position="diagonal")
    with pytest.raises(ValueError, match="mm_newline_position='diagonal'"):
        VTRLlavaOnevisionForConditionalGeneration(config)


def test_a_long_videos_facts_are_each_frames_own(ov_path, ov_processor, ov_stock):
    """12 frames (the tower's attention is recomputed a few frames at a time): each frame's pooled received
    attention is that frame's, as the eager tower gives it."""
    text = ov_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
        add_generation_prompt=True,
    )
    inputs = ov_processor(text=text, videos=[demo_video(12, 64)], return_tensors="pt")
    seen = facts_of(ov_path, inputs)
    with torch.no_grad():
        frames = ov_stock["eager"].model.vision_tower(inputs["pixel_values_videos"][0], output_attentions=True)
    per_frame = frames.attentions[-1].mean(1).mean(1).reshape(-1, 1, 4, 4)
    pooled = torch.nn.functional.interpolate(per_frame, size=(2, 2), mode="bilinear").reshape(-1)
    torch.testing.assert_close(seen[0]["importance"][:-1], pooled, atol=1e-5, rtol=0)


def test_videos_encoded_by_the_stock_code_are_laid_out_from_their_token_count(ov_path, ov_processor, video_path):
    """mm_encoder_outputs["video"] from the stock get_video_features (no frame count noted on it): a method that
    reads the visual grid keeps what it keeps from the pixels; LLaVA-Video's processor counts its layout's tokens."""
    text = ov_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
        add_generation_prompt=True,
    )
    inputs = ov_processor(text=text, videos=[demo_video(5, 64)], return_tensors="pt")
    model = load_model(ov_path, VTRConfig(strategy="pool", keep_tokens=8), attn_implementation="sdpa")
    with torch.no_grad():
        want = model(**inputs).logits
        kept = model.vtr_last.stages[0].kept_positions[0].tolist()
        encoded = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True)
        rest = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        got = model(**rest, mm_encoder_outputs={"video": encoded}).logits
    assert model.vtr_last.stages[0].kept_positions[0].tolist() == kept
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    processor = load_processor(video_path)
    assert processor._get_num_multimodal_tokens(video_sizes=[(4, 80, 80)]).num_video_tokens == [4 * 2 * 3]


# ---------------------------------------------------------------- the frames fact in each video layout


@pytest.fixture(scope="module")
def layout_paths(tmp_path_factory, ov_path):
    """mm_newline_position -> a tiny checkpoint laying videos out so (4 x 4 patches a frame, pooled to 2 x 2)."""
    return {
        position: ov_path
        if position == "one_token"
        else str(build_tiny_llava_onevision(tmp_path_factory.mktemp(f"tiny-ov-{position}"), newline_position=position))
        for position in NEWLINE_POSITIONS
    }


def frames_by_hand(position, video, frames=4):
    """(video, frame) of each token of a video of `frames` 2 x 2 pooled frames: "one_token" 4 patches a frame, then
    the video's one newline (-1, -1); "grid" a frame's 2 rows of 2 patches, each row closed by a newline of that
    frame; "frame" 4 patches and the frame's closing newline; "no_token" 4 patches a frame."""
    per_frame = {"one_token": 4, "grid": 2 * (2 + 1), "frame": 4 + 1, "no_token": 4}[position]
    rows = [(video, f) for f in range(frames) for _ in range(per_frame)]
    return rows + ([(-1, -1)] if position == "one_token" else [])


def rows_of(fact):
    return [tuple(row) for row in fact.tolist()]


def videos_and_an_image(processor):
    """Two prompts, left-padded: a 4-frame video; a video, a square image (46 tokens: base view and 5 x 5 tiles with
    row newlines) and another video (written out: the chat template puts every image before the videos)."""
    texts = [
        ov_chat(processor, "What moves?", kinds=("video",)),
        "<|im_start|>user\n<video>\n<image>\n<video>\nWhich clip shows the car?<|im_end|>\n<|im_start|>assistant\n",
    ]
    video = demo_video(4, 64)
    videos = [video, video[::-1].copy(), video[:, :, ::-1].copy()]
    return processor(text=texts, images=[demo_image(64)], videos=videos, return_tensors="pt", padding=True)


@pytest.mark.parametrize("position", NEWLINE_POSITIONS)
def test_frames_follow_each_video_layout(layout_paths, position):
    """The contract's video batch (one video a sample, left-padded): each token's (video, frame), the newlines of
    "grid" and "frame" their frame's, "one_token"'s video-closing newline none."""
    path = layout_paths[position]
    inputs = ov_videos(load_processor(path))
    assert inputs["attention_mask"][0, 0] == 0  # the first prompt is padded
    seen = facts_of(path, inputs)
    newlines = {  # the frames of the visual grid's off-grid rows
        "one_token": [(-1, -1)],
        "grid": [(0, f) for f in range(4) for _ in range(2)],
        "frame": [(0, f) for f in range(4)],
        "no_token": [],
    }[position]
    for b in range(2):
        assert seen[b]["frames"].dtype == torch.long
        assert rows_of(seen[b]["frames"]) == frames_by_hand(position, 0)
        assert rows_of(seen[b]["frames"][seen[b]["grid"][:, 0] < 0]) == newlines


@pytest.mark.parametrize("position", NEWLINE_POSITIONS)
def test_frames_number_each_samples_videos_and_leave_images_out(layout_paths, position):
    path = layout_paths[position]
    seen = facts_of(path, videos_and_an_image(load_processor(path)))
    assert rows_of(seen[0]["frames"]) == frames_by_hand(position, 0)
    want = frames_by_hand(position, 0) + [(-1, -1)] * 46 + frames_by_hand(position, 1)
    assert rows_of(seen[1]["frames"]) == want


def test_frames_of_an_image_and_a_video_prompt(ov_path, ov_batch):
    """The contract's mixed batch: a square (46 tokens) or wide (52) image's rows are (-1, -1), then the video."""
    seen = facts_of(ov_path, ov_batch)
    assert rows_of(seen[0]["frames"]) == [(-1, -1)] * 46 + frames_by_hand("one_token", 0)
    assert rows_of(seen[1]["frames"]) == [(-1, -1)] * 52 + frames_by_hand("one_token", 0)


def test_each_beam_reads_its_own_samples_frames(layout_paths):
    """generate(num_beams=2) repeats each sample twice in a row: rows 0 and 1 see sample 0's frames, 2 and 3
    sample 1's."""
    path = layout_paths["grid"]
    inputs = videos_and_an_image(load_processor(path))
    want = facts_of(path, inputs)
    SEEN.clear()
    model = load_model(path, VTRConfig(strategy="test_ov_facts", keep_ratio=0.5, prune_layer=0))
    model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2)
    assert sorted(SEEN) == [0, 1, 2, 3]
    for row, seen in SEEN.items():
        assert torch.equal(seen["frames"], want[row // 2]["frames"]), row


def test_only_the_video_family_declares_frames(tiny_path, next_path, ov_path):
    """A method that needs `frames` runs on OneVision; LLaVA-1.5 and 1.6 take no videos and refuse it by name."""

    @register_strategy("test_needs_frames")
    class NeedsFrames(PruningStrategy):
        needs_attention = False
        requires = ("frames",)

        def compute_scores(self, attention, image_token_range, config, **ctx):
            return torch.zeros(image_token_range[1] - image_token_range[0])

    assert load_model(ov_path, VTRConfig(strategy="test_needs_frames")).vtr_config.strategy == "test_needs_frames"
    for path in (tiny_path, next_path):
        with pytest.raises(ValueError, match="'test_needs_frames' is not supported on .*frames"):
            load_model(path, VTRConfig(strategy="test_needs_frames"))
