"""Bad serving input is a one-line error naming the value and what is accepted."""
import pytest

from backends.algorithms.serving import Request, ServingConfig, serve
from backends.strategies import Batching, Strategy
from backends.torch_ref.backend import TorchBackend
from harness.models import resolve_model


@pytest.fixture(scope="module")
def runner():
    return TorchBackend().load(resolve_model("tiny-random"), Strategy())  # at most 1024 positions


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_batching_name_is_a_usage_error(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("--batching", "dynamic")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: unknown batching strategy 'dynamic'; accepted: sequential, static, "
                                 "continuous, paged, paged-prefix"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


@pytest.mark.parametrize("size", [0, -16])
def test_block_size_must_be_positive(size):
    message = one_line_error(ServingConfig, Batching.PAGED, block_size=size)
    assert message == f"block size {size}; accepted: a positive integer"


def test_kv_budget_smaller_than_a_request(runner):
    request = Request(0, tuple(range(1, 41)), 1)
    message = one_line_error(serve, runner, [request], ServingConfig(Batching.PAGED, kv_tokens=32))
    assert message == ("KV budget of 32 tokens cannot hold request 0 (40 prompt + 1 new tokens in blocks of 16); "
                       "accepted: a budget of at least 48 tokens")
    message = one_line_error(serve, runner, [request], ServingConfig(Batching.CONTINUOUS, kv_tokens=512))
    assert message.startswith("KV budget of 512 tokens is smaller than one request's reservation of 1024 tokens")
    assert message.endswith("accepted: at least 1024")


def test_parallel_samples_must_be_positive_and_fit(runner):
    prompt = tuple(range(1, 41))
    message = one_line_error(serve, runner, [Request(3, prompt, 4, samples=0)], ServingConfig(Batching.PAGED))
    assert message == "request 3: samples 0; accepted: a positive integer"
    message = one_line_error(serve, runner, [Request(3, prompt, 4, samples=5)],
                             ServingConfig(Batching.PAGED, max_batch=4))
    assert message == "request 3: 5 samples run together, over max_batch 4; accepted: at most 4"
    # 2 full prompt blocks shared, then 1 block of each sample's own: 2 + 4 x 1 blocks of 16
    message = one_line_error(serve, runner, [Request(3, prompt, 4, samples=4)],
                             ServingConfig(Batching.PAGED, kv_tokens=80))
    assert message == ("KV budget of 80 tokens cannot hold request 3 (40 prompt + 4 new tokens, 4 samples in blocks "
                       "of 16); accepted: a budget of at least 96 tokens")


def test_request_longer_than_the_model(runner):
    request = Request(7, tuple(range(1, 1001)), 30)
    for batching in Batching:
        message = one_line_error(serve, runner, [request], ServingConfig(batching, kv_tokens=4096))
        assert message == ("request 7: 1000 prompt + 30 new tokens = 1030 exceed the maximum sequence length 1024; "
                           "accepted: at most 1024")


@pytest.mark.parametrize("option, value, message", [
    ("--slo", "latency:5", "ERROR: bad --slo 'latency:5': accepted NAME:MILLISECONDS with NAME one of ttft, tpot, "
                           "e2el and a positive number, e.g. ttft:500"),
    ("--burstiness", "0", "ERROR: bad --burstiness '0': accepted a positive number (1: Poisson arrivals, below 1: "
                          "burstier, above 1: more regular)"),
])
def test_bad_serving_options_are_usage_errors(pytester, option, value, message):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess(option, value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
