import os

import pytest

from lits import storage
from lits.errors import UserError
from tests.conftest import make_bucket


def test_local_write_is_atomic_and_lists_recursively(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    storage.write_bytes(str(target), b"hello")
    assert target.read_bytes() == b"hello"
    storage.write_bytes("file://" + str(tmp_path / "c.bin"), b"1")
    assert storage.list_files(str(tmp_path)) == [str(target), str(tmp_path / "c.bin")]


def test_failed_local_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), object())  # not bytes: fails mid-write
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_missing_input_names_the_uri(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}/nope.*does not exist"):
        storage.list_files(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="unsupported URI scheme"):
        storage.normalise("gs://bucket/x")
    with pytest.raises(UserError, match="names no bucket"):
        storage.normalise("s3://")


def test_unwritable_output_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        storage.check_writable(str(blocker / "sub"))


def test_s3_round_trip(s3_server):
    make_bucket(s3_server, "storage-test")
    root = "s3://storage-test/a"
    storage.write_bytes(root + "/x/1.bin", b"one", s3_server)
    storage.write_bytes(root + "/x/y/2.bin", b"two", s3_server)
    assert storage.list_files(root, s3_server) == [root + "/x/1.bin", root + "/x/y/2.bin"]
    assert storage.read_bytes(root + "/x/y/2.bin", s3_server) == b"two"
    storage.move_tree(root + "/x", root + "/moved", s3_server)
    assert storage.list_files(root, s3_server) == [root + "/moved/1.bin", root + "/moved/y/2.bin"]
    storage.delete(root, s3_server)
    assert not storage.exists(root + "/moved/1.bin", s3_server)
    with pytest.raises(UserError, match="s3://storage-test/none.*does not exist"):
        storage.list_files("s3://storage-test/none", s3_server)
    with pytest.raises(UserError, match="s3://no-such-bucket"):
        storage.list_files("s3://no-such-bucket/x", s3_server)
    storage.check_writable("s3://storage-test/out", s3_server)
    assert storage.list_files("s3://storage-test", s3_server) == []
