"""``log_images`` with real loggers, offline (TensorBoard, CSV, W&B, MLflow); images read back."""

from __future__ import annotations

import glob
import importlib
import io
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rsm import namespaces
from lightning_rsm.image_logging import image_file_name, log_images

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]
STEP = 5


def loggers_of(namespace: str):
    return importlib.import_module(f"{namespace}.loggers")


@pytest.fixture
def images() -> dict[str, np.ndarray]:
    """Two heatmaps that differ, tagged as RSMMonitor tags them."""
    return {
        "rsm/conv/heatmap": np.full((6, 6, 3), 200, dtype=np.uint8),
        "rsm/layer_rsa": np.arange(48, dtype=np.uint8).reshape(4, 4, 3),
    }


class Warnings(list):
    """Collects the messages ``log_images`` warns (its ``warn_once``), in order."""

    def __call__(self, message: str) -> None:
        self.append(message)


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.oldest
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_tensorboard_event_file_holds_each_image_at_step(namespace, tmp_path, images):
    logger = loggers_of(namespace).TensorBoardLogger(tmp_path, name="", version="")
    log_images([logger], images, STEP)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(images)
    for tag, image in images.items():
        (event,) = events.Images(tag)
        assert event.step == STEP
        assert (event.height, event.width) == image.shape[:2]
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        np.testing.assert_array_equal(decoded, image)


@pytest.mark.oldest
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_csv_logger_gets_flat_png_files(namespace, tmp_path, images):
    logger = loggers_of(namespace).CSVLogger(tmp_path, name="csv")
    log_images([logger], images, STEP)
    folder = os.path.join(logger.log_dir, "rsm")
    assert sorted(os.listdir(folder)) == [
        "rsm__conv__heatmap_step00000005.png",
        "rsm__layer_rsa_step00000005.png",
    ]
    for tag, image in images.items():
        np.testing.assert_array_equal(
            read_png(os.path.join(folder, image_file_name(tag, STEP))), image
        )


def test_any_object_with_log_dir_gets_files_and_odd_tags_stay_flat(tmp_path, images):
    class Folder:
        log_dir = tmp_path

    tag = "rsm/a b:c/../heatmap"
    log_images([Folder()], {tag: images["rsm/layer_rsa"]}, 0)
    assert os.listdir(tmp_path / "rsm") == ["rsm__a_b_c__..__heatmap_step00000000.png"]


@pytest.mark.oldest
def test_wandb_offline_run_holds_the_images(tmp_path, monkeypatch, images):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-rsm-test")
    try:
        log_images([logger], images, STEP)
    finally:
        wandb.finish()
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    media = os.path.join(run, "files", "media", "images")
    for tag, image in images.items():
        # W&B names the file <key>_<its own step>_<hash>.png, keeping the key's folders
        (path,) = glob.glob(os.path.join(media, f"{tag}_*.png"))
        np.testing.assert_array_equal(read_png(path), image)


def test_mlflow_run_holds_stepped_image_artifacts(tmp_path, monkeypatch, images):
    pytest.importorskip("mlflow")
    # mlflow-skinny has no SQL store; recent MLflow asks for this to use a file store.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="lightning-rsm-test", tracking_uri=uri)
    log_images([logger], images, STEP)
    client = MlflowClient(uri)
    paths = [artifact.path for artifact in client.list_artifacts(logger.run_id, "images")]
    for tag, image in images.items():
        prefix = f"images/{tag.replace('/', '~')}+step+{STEP}+"
        (png,) = [path for path in paths if path.startswith(prefix) and path.endswith(".png")]
        local = client.download_artifacts(logger.run_id, png, str(tmp_path))
        np.testing.assert_array_equal(read_png(local), image)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_failing_loggers_warn_and_the_others_still_get_images(namespace, tmp_path, images):
    loggers = loggers_of(namespace)

    class BrokenTensorBoard(loggers.TensorBoardLogger):
        @property
        def experiment(self):
            raise RuntimeError("the writer is closed")

    class UnmountedCSV(loggers.CSVLogger):
        @property
        def log_dir(self):
            raise OSError("the share is unmounted")

    blocked = loggers.CSVLogger(tmp_path, name="blocked")
    os.makedirs(blocked.log_dir)
    open(os.path.join(blocked.log_dir, "rsm"), "w").close()  # a file where the folder goes
    working = loggers.CSVLogger(tmp_path, name="working")
    failing = [BrokenTensorBoard(tmp_path), UnmountedCSV(tmp_path), blocked]
    warnings = Warnings()
    log_images([*failing, working], images, STEP, warn_once=warnings)
    assert [message.split("`")[1] for message in warnings] == [
        "BrokenTensorBoard",
        "UnmountedCSV",
        "CSVLogger",
    ]
    assert all("failed to take the RSM images" in message for message in warnings)
    assert "RuntimeError: the writer is closed" in warnings[0]
    assert "OSError: the share is unmounted" in warnings[1]
    assert "Error: [Errno" in warnings[2]
    assert len(os.listdir(os.path.join(working.log_dir, "rsm"))) == len(images)


def test_failure_is_a_warning_by_default(tmp_path, images):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="blocked")
    os.makedirs(logger.log_dir)
    open(os.path.join(logger.log_dir, "rsm"), "w").close()
    with pytest.warns(UserWarning, match="`CSVLogger` failed to take the RSM images"):
        log_images([logger], images, STEP)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_logger_without_images_or_log_dir_is_skipped_with_a_warning(namespace, images):
    class MetricsOnly(loggers_of(namespace).Logger):
        name = "metrics-only"
        version = 0

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    warnings = Warnings()
    log_images([MetricsOnly()], images, STEP, warn_once=warnings)
    assert warnings == [
        "`MetricsOnly` takes no images and has no `log_dir`: RSM figures are not logged to it. "
        "Images go to TensorBoard, W&B, MLflow and Comet loggers, and as PNG files to any logger "
        "with a `log_dir`."
    ]


def test_other_ranks_write_nothing(tmp_path, monkeypatch, images):
    from pytorch_lightning.loggers import CSVLogger

    monkeypatch.setattr(namespaces.rank_zero_only, "rank", 1)
    logger = CSVLogger(tmp_path, name="csv")
    log_images([logger], images, STEP)
    assert not os.path.exists(os.path.join(logger.log_dir, "rsm"))


@pytest.mark.parametrize(
    ("images", "step", "error", "match"),
    [
        ([("rsm/x", np.zeros((2, 2, 3), np.uint8))], 0, TypeError, "mapping of tag -> image"),
        ({"": np.zeros((2, 2, 3), np.uint8)}, 0, TypeError, "non-empty str, but got ''"),
        ({"rsm/x": np.zeros((2, 2), np.uint8)}, 0, ValueError, r"uint8 of shape \(2, 2\)"),
        ({"rsm/x": np.zeros((2, 2, 3))}, 0, ValueError, r"but got float64 of shape \(2, 2, 3\)"),
        ({"rsm/x": np.zeros((2, 2, 3), np.uint8)}, -1, ValueError, "non-negative int, but got -1"),
        ({"rsm/x": np.zeros((2, 2, 3), np.uint8)}, 1.0, ValueError, "non-negative int"),
    ],
)
def test_bad_input_raises(images, step, error, match):
    with pytest.raises(error, match=match):
        log_images([], images, step)


@pytest.mark.oldest
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_callback_sends_images_to_every_trainer_logger(namespace, tmp_path):
    """A callback on CALLBACK_BASES logs through trainer.loggers in a real fit, once per step."""
    from namespace_tools import IMAGE_TAG, EpochRecorder, tiny_data, tiny_module, tiny_trainer
    from torch.utils.data import DataLoader, TensorDataset

    loggers = loggers_of(namespace)
    tensorboard = loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = loggers.CSVLogger(tmp_path, name="csv", version=0)
    trainer = tiny_trainer(
        namespace,
        tmp_path,
        max_epochs=2,
        logger=[tensorboard, csv],
        callbacks=[EpochRecorder(images=True)],
    )
    trainer.fit(tiny_module(namespace), DataLoader(TensorDataset(*tiny_data()), batch_size=4))
    assert sorted(os.listdir(os.path.join(csv.log_dir, "rsm"))) == [
        image_file_name(IMAGE_TAG, 2),
        image_file_name(IMAGE_TAG, 4),
    ]
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images(IMAGE_TAG)] == [2, 4]
