"""What strategies learn about Video-LLaVA's visual tokens: frame grid, CLS rows, the vision tower's attention."""

import pytest
import torch
from videollava_testlib import vtr_model

from videollava.vtr import PruningStrategy, register_strategy
from videollava.vtr.prompts import encode, video_prompt

SEEN = []


@register_strategy("test_facts")
class Facts(PruningStrategy):
    needs_attention = False
    needs_vision_attention = True

    def compute_scores(self, attention, image_token_range, config, **ctx):
        facts = {k: ctx[k] for k in ("patch_grid", "video_frames", "frame_tokens", "batch_index")}
        facts.update(grid=ctx["visual_grid"](), importance=ctx["vision_importance"](), videos=ctx["video_grid"]())
        facts["frames"] = ctx["frames"]()
        facts["indices"] = ctx["image_token_indices"]
        SEEN.append(facts)
        start, end = image_token_range
        scores = torch.zeros(end - start)
        scores[ctx["image_token_indices"] - start] = facts["importance"]
        return scores


def _tower_cls_attention(tower, pixels):
    """The stock tower's own eager attention of its first layer (the one producing hidden_states[-2] in a
    2-layer tower), CLS query row, mean over heads: [views, tokens]."""
    out = tower(pixels, output_attentions=True, return_dict=True)
    return out.attentions[0][:, :, 0, :].mean(1)


def _run(model, inputs):
    SEEN.clear()
    with torch.no_grad():
        model(**inputs)
    return list(SEEN)


def _expected_grid(kinds, side=4):
    """(group, row, col) per visual position for a sequence of 'frame' / 'image' items, in order."""
    rows = []
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for kind in kinds:
        if kind == "frame":
            rows.append(torch.tensor([[-1, -1, -1]]))
        rows.append(torch.stack([torch.full_like(r, -2), r, c], -1).reshape(-1, 3))
    return torch.cat(rows)


def _expected_frames(kinds, frames=8, frame_tokens=17, image_tokens=16):
    """(video, frame) per visual position for a sequence of 'video' / 'image' items, in prompt order: a video is
    its frames one after the other, each its CLS row then its 16 patches."""
    rows, videos = [], 0
    for kind in kinds:
        if kind == "image":
            rows += [(-1, -1)] * image_tokens
            continue
        for t in range(frames):
            rows += [(videos, t)] * frame_tokens
        videos += 1
    return torch.tensor(rows)


@pytest.mark.parametrize(
    "inputs, kinds",
    [
        ("video_batch", [["video"], ["video"]]),
        ("mixed_batch", [["video", "image"], ["video"]]),
        ("image_batch", [["image"], ["image"]]),
    ],
)
def test_frames_give_each_token_its_video_and_frame_and_image_tokens_none(tiny_path, request, inputs, kinds):
    inputs = request.getfixturevalue(inputs)
    seen = _run(vtr_model(tiny_path, "sdpa", strategy="test_facts", prune_layer=0, keep_tokens=30), inputs)
    assert [f["batch_index"] for f in seen] == [0, 1]
    for facts, sample_kinds in zip(seen, kinds):
        assert facts["frames"].dtype == torch.long and facts["frames"].device == facts["indices"].device
        assert torch.equal(facts["frames"], _expected_frames(sample_kinds))


def test_frames_number_two_videos_of_one_prompt_past_an_image_between_them(tiny_path, processor, clips, image):
    inputs = encode(processor, ["USER: <video>\n<image>\n<video>\nWhat changes? ASSISTANT:"], clips, [image])
    (facts,) = _run(vtr_model(tiny_path, "sdpa", strategy="test_facts", prune_layer=0, keep_tokens=30), inputs)
    assert facts["videos"] == [(8, 4, 4)] * 2
    assert torch.equal(facts["frames"], _expected_frames(["video", "image", "video"]))


def test_video_facts_frame_grid_cls_rows_and_tower_attention(tiny_path, stock_models, mixed_batch):
    model = vtr_model(tiny_path, "eager", strategy="test_facts", prune_layer=0, keep_tokens=30)
    seen = _run(model, mixed_batch)
    assert [f["batch_index"] for f in seen] == [0, 1]
    first, second = seen
    assert first["patch_grid"] == (4, 4) and first["video_frames"] == 8 and first["frame_tokens"] == 17
    assert first["videos"] == [(8, 4, 4)] and second["videos"] == [(8, 4, 4)]

    # sample 0: a video (8 frames, CLS first in each) then an image (no CLS); sample 1: a video
    for facts, kinds in ((first, ["frame"] * 8 + ["image"]), (second, ["frame"] * 8)):
        want = _expected_grid(kinds)
        grid = facts["grid"]
        assert grid.shape == want.shape == (facts["indices"].numel(), 3)
        assert torch.equal(grid[:, 1:], want[:, 1:])
        assert torch.equal(grid[:, 0] < 0, want[:, 0] == -1), "CLS rows are off-grid, patches are not"
        groups = grid[grid[:, 0] >= 0, 0].reshape(len(kinds), 16)
        assert torch.equal(groups, torch.arange(len(kinds)).view(-1, 1).expand(-1, 16)), "a group per frame / image"

    stock = stock_models["eager"]
    videos = mixed_batch["pixel_values_videos"]
    video_attn = _tower_cls_attention(stock.model.video_tower, videos.flatten(0, 1)).reshape(2, 8 * 17)
    image_attn = _tower_cls_attention(stock.model.image_tower, mixed_batch["pixel_values"])[:, 1:]  # CLS dropped
    torch.testing.assert_close(first["importance"], torch.cat([video_attn[0], image_attn[0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(second["importance"], video_attn[1], atol=1e-6, rtol=0)


def test_facts_line_up_through_generate_and_beam_search(tiny_path, mixed_batch):
    model = vtr_model(tiny_path, "sdpa", strategy="test_facts", prune_layer=0, keep_tokens=30)
    direct = _run(model, mixed_batch)
    SEEN.clear()
    model.generate(**mixed_batch, max_new_tokens=2, do_sample=False, num_beams=2)
    assert len(SEEN) == 4, "each sample twice (two beams)"
    for b, facts in enumerate(SEEN):
        want = direct[b // 2]
        assert torch.equal(facts["grid"], want["grid"])
        assert torch.equal(facts["frames"], _expected_frames(["video", "image"] if b < 2 else ["video"]))
        torch.testing.assert_close(facts["importance"], want["importance"], atol=1e-6, rtol=0)


def test_the_anchor_after_the_video_is_the_same_token_whatever_the_question(processor, clips, tiny_path):
    """PriorTR's question-free row is the token after the visual span: our prompt puts '\\n' there."""
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=10)
    anchors = []
    for question in ("What happens?", "Is there a ball? Answer yes or no."):
        ids = encode(processor, [video_prompt(question)], videos=clips[:1])["input_ids"][0]
        visual = (ids == model.config.video_token_id).nonzero().reshape(-1)
        anchor = model.vtr_adapter.anchor_row(int(visual[-1]) + 1)
        anchors.append(processor.tokenizer.decode(ids[anchor : anchor + 1]))
    assert anchors == ["\n", "\n"]


def test_pre_encoded_features_without_tower_states_are_refused_for_importance(tiny_path, stock_models, video_single):
    stock = stock_models["eager"]
    encoded = stock.model.get_video_features(pixel_values_videos=video_single["pixel_values_videos"])
    encoded.hidden_states = None  # as from a plain stock call that kept none of the tower's states
    model = vtr_model(tiny_path, "sdpa", strategy="test_facts", prune_layer=0, keep_tokens=30)
    inputs = {k: v for k, v in video_single.items() if k != "pixel_values_videos"}
    with pytest.raises(ValueError, match="hidden states"):
        model(**inputs, mm_encoder_outputs={"video": encoded})


def test_pre_encoded_features_are_a_prefill_to_prune_like_pixels(tiny_path, stock_models, mixed_batch):
    """transformers' generate() hands over encoded visuals (`mm_encoder_outputs`): same tokens kept, same logits."""
    model = vtr_model(tiny_path, "eager", strategy="vispruner", prune_layer=2, keep_tokens=40)
    stock = stock_models["eager"].model
    with torch.no_grad():
        want = model(**mixed_batch).logits
        kept = model.vtr_last.stages[0].kept_positions
        encoded = {
            "image": stock.get_image_features(pixel_values=mixed_batch["pixel_values"], output_hidden_states=True),
            "video": stock.get_video_features(
                pixel_values_videos=mixed_batch["pixel_values_videos"], output_hidden_states=True
            ),
        }
        text = {k: mixed_batch[k] for k in ("input_ids", "attention_mask")}
        got = model(**text, mm_encoder_outputs=encoded).logits
    assert model.vtr_last is not None, "pruned, not passed through"
    assert all(torch.equal(a, b) for a, b in zip(model.vtr_last.stages[0].kept_positions, kept))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
