import os

import pytest
import torch

# two cores: keep intra-op threads low so parallel test processes do not thrash
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_args():
    from mpdit_dist.models import model_args

    return model_args("custom", stages=((4, 2), (2, 1)), hidden_size=64, num_heads=4, input_size=16,
                      in_channels=3, num_classes=10, num_condition_tokens=4)


@pytest.fixture(scope="session")
def npz(tmp_path_factory):
    """240 digits as a data.format=memory .npz: the trainer tests' data (read-only, so shared)."""
    from tests.helpers.runs import digits_npz

    return digits_npz(tmp_path_factory.mktemp("data") / "digits.npz", n=240)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """A results directory, and so an MLflow SQLite store, shared by one test module's runs."""
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def client(results_dir):
    """An MlflowClient on ``results_dir``'s store."""
    from mlflow.tracking import MlflowClient

    from mpdit_dist.tracking import default_tracking_uri

    return MlflowClient(tracking_uri=default_tracking_uri(results_dir))


@pytest.fixture(scope="module")
def net():
    """A small randomly initialised Inception-like feature network (75x75 input: 63 spatial features)."""
    from mpdit_dist.inception import random_feature_net

    return random_feature_net(seed=0, input_size=75)


@pytest.fixture()
def forwards(net):
    """The batch sizes of ``net``'s forward passes during a test."""
    calls = []
    handle = net.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    yield calls
    handle.remove()
