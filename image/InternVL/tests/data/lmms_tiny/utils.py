"""Task functions of the tiny offline lmms-eval tasks used by the internvl_vtr end-to-end test.

The media are drawn by the test (`make_media`): two square images (2 x 2 tiles + thumbnail on the tiny
model), two wide ones (2 x 1 + thumbnail) and two short mp4 clips, so nothing binary is committed."""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def make_media(root: Path) -> None:
    from internvl_vtr.video_io import write_test_video

    shapes = {
        "red_square": ((64, 64), (220, 40, 40), "rectangle"),
        "blue_circle": ((64, 64), (40, 60, 220), "ellipse"),
        "green_bar": ((64, 32), (40, 180, 60), "rectangle"),
        "yellow_bar": ((64, 32), (230, 210, 40), "ellipse"),
    }
    (root / "images").mkdir(exist_ok=True)
    for name, (size, colour, kind) in shapes.items():
        image = Image.new("RGB", size, (255, 255, 255))
        getattr(ImageDraw.Draw(image), kind)([8, 8, size[0] - 8, size[1] - 8], fill=colour)
        image.save(root / "images" / f"{name}.png")
    for i in range(2):
        write_test_video(root / "videos" / f"clip{i}.mp4", num_frames=8 + 4 * i, size=(40, 32))


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_video(doc):
    return [str(HERE / doc["video"])]  # lmms-eval video tasks hand the model a file path


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{doc['question']}{post}"


def process_results(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"])}


def doc_to_choice_index(doc):
    return ["yes", "no"].index(doc["answer"])
