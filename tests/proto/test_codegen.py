"""The committed generated code is exactly what the pinned codegen step produces."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("telemetry_pb2.py", "telemetry_pb2.pyi", "telemetry_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path):
    (tmp_path / "proto" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "proto/v1/telemetry.proto", tmp_path / "proto/v1/telemetry.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "proto/v1/telemetry.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "proto/v1" / name).read_text()
        committed = (ROOT / "proto/v1" / name).read_text()
        assert fresh == committed, f"proto/v1/{name} is stale: run `make proto` and commit"


def test_every_client_frame_kind_carries_a_header():
    from proto.v1 import telemetry_pb2 as pb

    kinds = pb.ClientFrame.DESCRIPTOR.oneofs_by_name["kind"].fields
    for field in kinds:
        msg = field.message_type
        if msg.name == "FrameBatch":  # the one container: its frames carry the headers
            assert [f.message_type for f in msg.fields] == [pb.ClientFrame.DESCRIPTOR]
            continue
        assert "header" in msg.fields_by_name, f"{msg.name} lacks FrameHeader"
        assert msg.fields_by_name["header"].message_type.name == "FrameHeader"
    assert sum(f.message_type.name == "FrameBatch" for f in kinds) == 1


def test_a_chunk_ends_its_step_only_when_it_says_so():
    """The end-of-step fields are additive: a StepChunk from an older client parses as a plain
    chunk, an older collector's Welcome as one without the capability."""
    from proto.v1 import telemetry_pb2 as pb

    old_chunk = pb.StepChunk(
        header=pb.FrameHeader(run="r", rank=0, step=3, seq=4),
        schema_id=1,
        offset=0,
        total=1,
        values=b"\0\0\x80?",
    ).SerializeToString()
    chunk = pb.StepChunk.FromString(old_chunk)
    assert not chunk.ends_step and chunk.step_values == 0 and chunk.wall_time == 0.0
    assert not pb.Welcome.FromString(pb.Welcome(acked_seq=7).SerializeToString()).chunk_ends_step
    fields = pb.StepChunk.DESCRIPTOR.fields_by_name
    assert [fields[n].number for n in ("ends_step", "step_values", "wall_time")] == [6, 7, 8]
    assert pb.Welcome.DESCRIPTOR.fields_by_name["chunk_ends_step"].number == 3
