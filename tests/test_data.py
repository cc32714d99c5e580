"""bimask_hf.data: local Fashion-MNIST, digits and image folders, recipes, streaming, sharding, errors.

Nothing here touches the network: Hub look-ups run with the Hub switched off.
"""

from __future__ import annotations

import gzip
import pickle
from collections import Counter
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import Mixup

import bimask_hf.models.cifar  # noqa: F401  (registers resnet8_cifar with timm)
from bimask_hf.data import DataError, ImageClassificationData, load_image_classification_data
from bimask_hf.data.local import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist_available

pytest.importorskip("sklearn", reason="the digits dataset comes from scikit-learn")

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR})",
)
IDENTITY = dict(mean=(0.0,), std=(1.0,))  # normalisation that keeps pixels in [0, 1]
# Solid colour per class so a label can be checked against its image after loading.
CLASS_COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "owl": (128, 128, 128)}


def _raw_idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST_DIR / name, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


@pytest.fixture(scope="module")
def fashion() -> ImageClassificationData:
    if not fashion_mnist_available():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR})")
    return load_image_classification_data("fashion_mnist", in_chans=1, **IDENTITY)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the Hub off so a Hub id fails at once instead of retrying a dead network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _write_image_folder(root: Path, eval_dir: str = "val", per_class: int = 4) -> Path:
    """train/ and eval_dir/ with cat (RGB), dog (RGB) and owl (grayscale) images of varied sizes."""
    for split, count in (("train", per_class), (eval_dir, 2)):
        for name, colour in CLASS_COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for idx in range(count):
                size = (12 + idx, 10 + 2 * idx)
                image = Image.new("L", size, colour[0]) if name == "owl" else Image.new("RGB", size, colour)
                image.save(root / split / name / f"{idx}.png")
    return root


# ------------------------------------------------------------------------------------------------ local data


@needs_fashion_mnist
def test_fashion_mnist_sizes_classes_and_pixels(fashion: ImageClassificationData) -> None:
    data = fashion
    # Built in memory from the IDX files with no image encoding (PGM bytes) and no on-disk cache: what
    # keeps the 70k-image load fast, checked without timing it.
    for split in (data.train_dataset, data.eval_dataset):
        assert split.cache_files == []
        assert split.data.column("pixel_values")[0].as_py()["bytes"].startswith(b"P5\n28 28\n255\n")
    assert isinstance(data.train_dataset, datasets.Dataset)
    assert (len(data.train_dataset), len(data.eval_dataset)) == (60_000, 10_000)
    assert data.labels == list(FASHION_MNIST_CLASSES) and data.num_labels == 10
    assert data.labels[0] == "T-shirt/top" and data.labels[9] == "Ankle boot"
    assert data.id2label[9] == "Ankle boot" and data.label2id["Bag"] == 8
    assert data.train_dataset.features["labels"].names == data.labels
    assert isinstance(data.train_dataset.features["pixel_values"], datasets.Image)
    # Pixels and labels are those of the IDX files, in order.
    raw_images = _raw_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    raw_labels = _raw_idx("t10k-labels-idx1-ubyte.gz", 8)
    for idx in (0, 1234, 9999):
        example = data.eval_dataset[idx]
        assert example["pixel_values"].shape == (1, 28, 28)
        assert torch.equal(
            (example["pixel_values"][0] * 255).round().to(torch.uint8), torch.tensor(raw_images[idx])
        )
        assert example["labels"] == raw_labels[idx]
    assert Counter(data.eval_dataset.with_format(None)["labels"]) == Counter({c: 1000 for c in range(10)})


@needs_fashion_mnist
def test_fashion_mnist_grayscale_to_three_channels() -> None:
    data = load_image_classification_data("fashion_mnist")
    pixels = data.eval_dataset[0]["pixel_values"]
    assert pixels.shape == (3, 28, 28) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    assert data.data_config["input_size"] == (3, 28, 28)
    # Normalised with Fashion-MNIST's own statistics, replicated over the three channels.
    raw = torch.tensor(_raw_idx("t10k-images-idx3-ubyte.gz", 16)[: 28 * 28].reshape(28, 28)) / 255
    assert torch.allclose(pixels[0], (raw - 0.2860) / 0.3530, atol=1e-5)


@needs_fashion_mnist
def test_fashion_mnist_streaming() -> None:
    data = load_image_classification_data("fashion_mnist", streaming=True, shuffle_buffer=64, recipe="cifar")
    assert isinstance(data.train_dataset, datasets.IterableDataset)
    examples = list(data.train_dataset.take(5))
    assert [e["pixel_values"].shape for e in examples] == [(3, 32, 32)] * 5
    assert all(0 <= e["labels"] < 10 for e in examples)


def test_digits_sizes_and_native_size() -> None:
    data = load_image_classification_data("digits")
    assert (len(data.train_dataset), len(data.eval_dataset)) == (1437, 360)
    assert data.labels == [str(d) for d in range(10)]
    example = data.train_dataset[0]
    assert example["pixel_values"].shape == (3, 8, 8) and example["labels"] == 0


def test_max_samples_take_a_random_subset_of_all_classes() -> None:
    data = load_image_classification_data("digits", max_train_samples=100, max_eval_samples=20)
    assert (len(data.train_dataset), len(data.eval_dataset)) == (100, 20)
    assert len(set(data.train_dataset.with_format(None)["labels"])) == 10


# ------------------------------------------------------------------------------------------------ image folders


@pytest.mark.parametrize("eval_dir", ["val", "validation", "test"])
def test_image_folder_splits_labels_and_rgb(tmp_path: Path, eval_dir: str) -> None:
    root = _write_image_folder(tmp_path / "pets", eval_dir=eval_dir)
    data = load_image_classification_data(
        str(root), image_size=16, cache_dir=str(tmp_path / "cache"), **IDENTITY
    )
    assert data.labels == ["cat", "dog", "owl"]
    assert (len(data.train_dataset), len(data.eval_dataset)) == (12, 6)
    for example in data.train_dataset:
        pixels = example["pixel_values"]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        expected = torch.tensor(CLASS_COLOURS[data.labels[example["labels"]]]) / 255
        assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=1e-2)


def test_image_folder_streaming(tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "pets")
    data = load_image_classification_data(
        str(root), streaming=True, image_size=8, cache_dir=str(tmp_path / "c")
    )
    assert isinstance(data.train_dataset, datasets.IterableDataset)
    labels = [example["labels"] for example in data.train_dataset]
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert data.labels == ["cat", "dog", "owl"]


# ------------------------------------------------------------------------------------------------ sharding


def _stream_keys(dataset: datasets.IterableDataset) -> Counter:
    return Counter((e["pixel_values"].numpy().tobytes(), e["labels"]) for e in dataset)


def test_streaming_shards_are_disjoint_and_cover_the_data() -> None:
    common = dict(streaming=True, shuffle_buffer=100, seed=3)
    full = _stream_keys(load_image_classification_data("digits", world_size=1, **common).train_dataset)
    shards = [
        _stream_keys(
            load_image_classification_data("digits", rank=rank, world_size=2, **common).train_dataset
        )
        for rank in (0, 1)
    ]
    assert sum(full.values()) == 1437
    assert all(400 < sum(shard.values()) < 1037 for shard in shards)
    assert shards[0] + shards[1] == full
    duplicates = {key for key, count in full.items() if count > 1}
    assert not (set(shards[0]) & set(shards[1])) - duplicates


def test_streaming_max_samples_is_split_across_ranks() -> None:
    common = dict(streaming=True, shuffle_buffer=50, world_size=2, max_train_samples=40)
    sizes = [
        sum(1 for _ in load_image_classification_data("digits", rank=rank, **common).train_dataset)
        for rank in (0, 1)
    ]
    assert sum(sizes) == 40


# ------------------------------------------------------------------------------------------------ recipes


def test_cifar_recipe_pads_crops_and_flips() -> None:
    data = load_image_classification_data("digits", recipe="cifar", model="resnet8_cifar")
    names = [type(t).__name__ for t in data.train_transform.transforms]
    assert "RandomCrop" in names and "RandomHorizontalFlip" in names
    crop = next(t for t in data.train_transform.transforms if type(t).__name__ == "RandomCrop")
    assert crop.padding == 4
    assert data.data_config["mean"] == (0.4914, 0.4822, 0.4465)  # the model's CIFAR statistics
    assert data.train_dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert data.mixup_fn is None
    # Eval is deterministic, train is not.
    image = Image.new("RGB", (32, 32))
    image.putdata([(i % 256, (3 * i) % 256, (7 * i) % 256) for i in range(32 * 32)])
    assert torch.equal(data.eval_transform(image), data.eval_transform(image))
    torch.manual_seed(0)
    assert any(not torch.equal(data.train_transform(image), data.eval_transform(image)) for _ in range(5))


def test_model_input_channels_and_size_are_followed() -> None:
    model = timm.create_model("resnet8_cifar", in_chans=1)
    data = load_image_classification_data("digits", model=model, max_train_samples=4)
    assert data.data_config["input_size"] == (1, 32, 32)
    assert len(data.data_config["mean"]) == 1
    assert data.train_dataset[0]["pixel_values"].shape == (1, 32, 32)
    with torch.no_grad():
        assert model(data.collate_fn(list(data.train_dataset))["pixel_values"]).shape == (4, 10)


def test_imagenet_recipe_sizes() -> None:
    data = load_image_classification_data("digits", recipe="imagenet", max_eval_samples=2)
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    assert data.train_transform(image).shape == (3, 224, 224)
    assert data.eval_transform(image).shape == (3, 224, 224)
    resize = data.eval_transform.transforms[1].transforms[0]
    assert resize.size == 256  # 224 / crop_pct 0.875


def test_deit_recipe_mixup_and_in_chans_one() -> None:
    data = load_image_classification_data("digits", recipe="deit", image_size=32, in_chans=1)
    assert isinstance(data.mixup_fn, Mixup)
    assert data.mixup_fn.mixup_alpha == 0.8 and data.mixup_fn.cutmix_alpha == 1.0
    assert data.mixup_fn.label_smoothing == 0.1
    batch = data.collate_fn([data.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 32, 32)
    pixels, targets = data.mixup_fn(batch["pixel_values"], batch["labels"])
    assert pixels.shape == (4, 1, 32, 32) and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    off = load_image_classification_data("digits", recipe="deit", mixup_alpha=0, cutmix_alpha=0)
    assert off.mixup_fn is None


def test_collate_fn_batch_for_trainer() -> None:
    data = load_image_classification_data("digits", image_size=12)
    assert data.train_dataset.column_names == ["pixel_values", "labels"]  # kept by remove_unused_columns
    batch = data.collate_fn([data.train_dataset[i] for i in range(5)])
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (5, 3, 12, 12) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 3, 4]
    # DataLoader workers receive the dataset, with its lazy transform, by pickling.
    copy = pickle.loads(pickle.dumps(data.train_dataset))
    assert torch.equal(copy[7]["pixel_values"], data.train_dataset[7]["pixel_values"])


def test_batch_feeds_a_timm_wrapper_model() -> None:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet8_cifar", num_labels=10))
    data = load_image_classification_data("digits", model=model, recipe="cifar")
    batch = data.collate_fn([data.train_dataset[i] for i in range(4)])
    out = model(**batch)
    assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DataError, match="Unknown dataset 'cifar11'") as info:
        load_image_classification_data("cifar11")
    message = str(info.value)
    assert (
        "cifar10" in message and "fashion_mnist" in message and "Hub" in message and "local folder" in message
    )


@pytest.mark.parametrize("path", ["/no/such/dataset", "./no-such-dataset", "~/no-such-dataset-xyz"])
def test_missing_local_path(path: str) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_classification_data(path)


def test_partially_existing_path_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="does not exist"):
        load_image_classification_data("data/cifar")


def test_folder_without_train(tmp_path: Path) -> None:
    (tmp_path / "training_images").mkdir()
    with pytest.raises(DataError, match="no train/ sub-folder") as info:
        load_image_classification_data(str(tmp_path))
    assert "training_images" in str(info.value)


def test_missing_columns_name_the_argument(tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "pets")
    with pytest.raises(
        DataError, match=r"Image column 'photo' not found.*\['image', 'label'\].*image_column="
    ):
        load_image_classification_data(str(root), image_column="photo", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"Label column 'kind' not found.*label_column="):
        load_image_classification_data(str(root), label_column="kind", cache_dir=str(tmp_path / "c"))


def test_folder_without_class_folders_has_no_label_column(tmp_path: Path) -> None:
    (tmp_path / "flat" / "train").mkdir(parents=True)
    for idx in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "train" / f"{idx}.png")
    with pytest.raises(DataError, match=r"No label column found.*label_column="):
        load_image_classification_data(str(tmp_path / "flat"), cache_dir=str(tmp_path / "c"))


def test_missing_split_lists_splits() -> None:
    with pytest.raises(DataError, match=r"No split 'dev'.*\['train', 'test'\].*eval_split="):
        load_image_classification_data("digits", eval_split="dev")


def test_unknown_recipe() -> None:
    with pytest.raises(DataError, match="Unknown recipe 'imagenet21k'"):
        load_image_classification_data("digits", recipe="imagenet21k")


@pytest.mark.usefixtures("hub_offline")
def test_unreachable_hub_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    attempts: list[object] = []  # offline means no connection at all (no retries against a dead network)

    def connect(self, address):  # type: ignore[no-untyped-def]
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(DataError, match="Could not fetch the dataset 'someone/some-images'") as info:
        load_image_classification_data("someone/some-images")
    assert attempts == []
    assert "HF_DATASETS_OFFLINE" in str(info.value) and "local" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert isinstance(info.value, ValueError)
