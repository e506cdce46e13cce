"""The contract: buf lint clean, never broken against a release, fresh stubs in every language."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "services" / "common" / "api"
PROTOS = ROOT / "protos"
RELEASES = sorted((PROTOS / "releases").glob("*.binpb"))
CODEGEN_BIN = ROOT / "build" / "codegen" / "node_modules" / ".bin"
GO_PLUGINS = ("protoc-gen-go", "protoc-gen-go-grpc")


def _buf() -> str:
    return shutil.which("buf") or str(Path(sys.executable).parent / "buf")


def _run_buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True)


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    result = subprocess.run([_buf(), "build", "--exclude-source-info", "-o", "-"], cwd=ROOT, capture_output=True,
                            check=True)
    return list(descriptor_pb2.FileDescriptorSet.FromString(result.stdout).file)


def _missing_generators() -> list[str]:
    missing = [name for name in GO_PLUGINS if not shutil.which(name)]
    missing += [str(CODEGEN_BIN / name) for name in ("protoc-gen-es", "tsc") if not (CODEGEN_BIN / name).exists()]
    return missing


def test_buf_lint_clean():
    result = _run_buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True,
                   capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(API) for p in API.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == committed, "run `python scripts/gen_protos.py`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, API / p, shallow=False)]
    assert not stale, f"stale generated files {stale}: run `python scripts/gen_protos.py`"


def expected_language_options(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """The one rule every proto's language options follow, from its package and file name.

    triptych.llm.v1 in llm.proto -> Go triptych/gen/go/triptych/llm/v1 (package llmv1), Java
    com.triptych.llm.v1 (LlmProto), C# Triptych.Llm.V1, and so on, as buf's managed mode names them.
    """
    _, service, version = file.package.split(".")
    pascal = [service.capitalize(), version.upper()]
    stem = Path(file.name).stem
    return {
        "csharp_namespace": ".".join(["Triptych", *pascal]),
        "go_package": f"triptych/gen/go/triptych/{service}/{version};{service}{version}",
        "java_multiple_files": True,
        "java_outer_classname": "".join(word.capitalize() for word in stem.split("_")) + "Proto",
        "java_package": f"com.triptych.{service}.{version}",
        "objc_class_prefix": f"T{service[0].upper()}X",
        "php_namespace": "\\".join(["Triptych", *pascal]),
        "ruby_package": "::".join(["Triptych", *pascal]),
    }


def test_language_options_follow_the_package():
    # buf.yaml's breaking check leaves these options to this test (v0.1.0 had none).
    files = _files()
    assert files
    for file in files:
        options = {name: getattr(file.options, name) for name in expected_language_options(file)}
        assert options == expected_language_options(file), file.name


@pytest.mark.parametrize("release", RELEASES, ids=lambda p: p.stem)
def test_no_breaking_change_since_release(release):
    result = _run_buf("breaking", "--against", str(release.relative_to(ROOT)))
    assert result.returncode == 0, f"breaking change against {release.name}:\n{result.stdout}{result.stderr}"


def test_breaking_check_catches_a_renamed_field(tmp_path):
    # The check above only means something if it fails on a real break: rename a field in a copy.
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(PROTOS, tmp_path / "protos")
    generation = tmp_path / "protos" / "triptych" / "common" / "v1" / "generation.proto"
    text = generation.read_text()
    assert "int32 max_new_tokens = 1;" in text
    generation.write_text(text.replace("int32 max_new_tokens = 1;", "int32 max_tokens = 1;"))
    result = _run_buf("breaking", "--against", str(RELEASES[0]), cwd=tmp_path)
    assert result.returncode != 0
    assert "max_new_tokens" in result.stdout, result.stdout + result.stderr


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """`buf generate` with buf.gen.yaml's local plugins (scripts/setup_codegen.sh installs them)."""
    missing = _missing_generators()
    if missing:
        # scripts/test.sh installs them: a skip would hide a broken setup.
        pytest.fail(f"code generators not installed (run scripts/setup_codegen.sh): {missing}")
    out = tmp_path_factory.mktemp("gen")
    result = _run_buf("generate", "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_go_and_typescript_stubs_for_every_proto(generated):
    for file in _files():
        base = file.name.removesuffix(".proto")
        expected = [f"go/{base}.pb.go", f"ts/{base}_pb.ts"]
        if file.service:
            expected.append(f"go/{base}_grpc.pb.go")
        missing = [path for path in expected if not (generated / path).is_file()]
        assert not missing, f"{file.name}: no {missing}"
        _, service_name, version = file.package.split(".")
        assert f"package {service_name}{version}\n" in (generated / f"go/{base}.pb.go").read_text()
        for service in file.service:
            assert f"type {service.name}Client interface" in (generated / f"go/{base}_grpc.pb.go").read_text()
            assert f"export const {service.name}: GenService<" in (generated / f"ts/{base}_pb.ts").read_text()


def test_typescript_stubs_compile(generated):
    ts = generated / "ts"
    (ts / "node_modules").symlink_to(CODEGEN_BIN.parent)
    (ts / "tsconfig.json").write_text(
        '{"compilerOptions": {"strict": true, "noEmit": true, "target": "es2020", "module": "esnext",'
        ' "moduleResolution": "bundler"}, "include": ["triptych/**/*.ts"]}')
    result = subprocess.run([str(CODEGEN_BIN / "tsc"), "-p", str(ts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
