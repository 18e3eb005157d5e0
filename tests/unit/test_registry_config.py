"""--registry and its flags: a directory or s3://bucket/prefix, checked at start-up with the
flag named; open_registry on a real S3-compatible server with a secret read from a file."""

from __future__ import annotations

import pytest
from adapterd.__main__ import build_parser
from adapterd.config import Config, ConfigError, RegistryConfig
from adapterd.registry.storage import LocalStorage, S3Storage
from adapterd.registry.store import open_registry


def _config(*flags) -> Config:
    return Config.from_args(build_parser().parse_args(["serve", *flags]))


def test_defaults_and_s3(tmp_path):
    local = _config().registry
    assert local.location == "adapters" and local.list_ttl_s == 0 and local.max_adapter_bytes == 2**30
    s3 = _config("--registry", "s3://bucket/team", "--s3-endpoint", "http://127.0.0.1:9000",
                 "--max-adapter-bytes", "1000", "--registry-refresh", "0.5").registry
    assert s3.is_s3 and s3.s3_endpoint == "http://127.0.0.1:9000" and s3.list_ttl_s == 0.5
    assert s3.max_adapter_bytes == 1000
    assert RegistryConfig(location="s3://b").list_ttl_s == 2.0


@pytest.mark.parametrize("kwargs,flag", [
    (dict(location=""), "--registry"),
    (dict(location="s3://"), "no bucket"),
    (dict(location="http://x/y"), "use a directory or s3://"),
    (dict(s3_endpoint="http://x"), "--s3-endpoint needs --registry s3://"),
    (dict(location="s3://b", s3_access_key_id="k"), "go together"),
    (dict(location="s3://b", s3_access_key_id="k", s3_secret_file="/nonexistent/secret"), "--s3-secret-access-key-file"),
    (dict(max_adapter_bytes=0), "--max-adapter-bytes"),
    (dict(refresh_s=-1), "--registry-refresh"),
    (dict(deleted_grace_s=-1), "--deleted-grace"),
])
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        RegistryConfig(**kwargs)


def test_open_registry_local_and_s3(tmp_path, s3_bucket):
    reg = open_registry(RegistryConfig(location=str(tmp_path / "r")), max_rank=8)
    assert isinstance(reg.storage, LocalStorage) and reg.max_rank == 8 and reg.require_spec
    endpoint, bucket = s3_bucket
    secret = tmp_path / "secret"
    secret.write_text("test\n")  # moto takes any secret; make sure it is read, stripped, and not shown
    config = RegistryConfig(location=f"s3://{bucket}/p", s3_endpoint=endpoint, s3_region="us-east-1",
                            s3_access_key_id="test", s3_secret_file=secret)
    assert config.s3_secret == "test" and "s3_secret=" not in repr(config)
    reg = open_registry(config, max_rank=8)
    assert isinstance(reg.storage, S3Storage) and reg.list_ttl_s == 2.0
    assert reg.storage.create("probe/x", b"1") and not reg.storage.create("probe/x", b"2")
    assert reg.storage.read("probe/x") == b"1"
