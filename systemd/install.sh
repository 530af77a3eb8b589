#!/usr/bin/env bash
# Install the Hematovision edge daemon on Raspberry Pi OS Bookworm (64-bit), from this repository.
#
#   sudo systemd/install.sh [--dry-run] [--usb-gadget] [--no-enable] [--prefix DIR]
#
#   --dry-run     print every step and change nothing (no root needed)
#   --usb-gadget  also set up USB gadget serial (dtoverlay=dwc2, g_serial): /dev/ttyGS0 for report links
#   --no-enable   install, but do not enable or start the service
#   --prefix DIR  where the source copy and the virtual environment go (default /opt/hematovision)
#
# The numpy trap: Bookworm's picamera2 stack (python3-picamera2, python3-libcamera, simplejpeg,
# python3-av) is built against Debian's numpy 1.24, and a venv made with --system-site-packages
# sees it. OpenCV wheels from 4.12 on require numpy >= 2; pip would then install numpy 2 into the
# venv, shadow Debian's, and picamera2's compiled modules fail to import ("compiled using NumPy
# 1.x cannot be run in NumPy 2.x"). So the venv keeps Debian's numpy (numpy<2, satisfied by
# python3-numpy), with opencv-python-headless 4.11.0.86 (the last release that accepts numpy 1.x:
# numpy>=1.23.5 on Python 3.11) and ai-edge-litert 1.4.0 (numpy>=1.23.2, aarch64 cp311 wheel).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/hematovision
CONF_DIR=/etc/hematovision
UNIT_DIR=/etc/systemd/system
SERVICE=hematovision.service
SERVICE_USER=hematovision
DRY_RUN=0
USB_GADGET=0
ENABLE=1

CONSTRAINTS="numpy<2
opencv-python-headless==4.11.0.86
ai-edge-litert==1.4.0
pyserial==3.5"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --usb-gadget) USB_GADGET=1 ;;
        --no-enable) ENABLE=0 ;;
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
VENV="$PREFIX/venv"
SRC="$PREFIX/src"

step() { echo "== $*"; }

# Run a command, or only print it under --dry-run.
run() {
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# Write stdin to a file (mode $2), or only print what would be written under --dry-run.
write_file() {
    local path="$1" mode="$2" text
    text="$(cat)"
    echo "+ write $path (mode $mode):"
    printf '%s\n' "$text" | sed 's/^/|   /'
    if [ "$DRY_RUN" -eq 0 ]; then
        printf '%s\n' "$text" > "$path.tmp"
        chmod "$mode" "$path.tmp"
        mv "$path.tmp" "$path"
    fi
}

check_system() {
    step "check the system: Raspberry Pi OS Bookworm, 64-bit, root"
    local codename arch
    codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-unknown}")" || codename=unknown
    arch="$(uname -m)"
    if [ "$codename" != bookworm ] || [ "$arch" != aarch64 ]; then
        echo "warning: this is $codename on $arch; the script is made for Bookworm on aarch64" >&2
        if [ "$DRY_RUN" -eq 0 ]; then echo "install.sh: refusing to install here; use --dry-run to see the steps" >&2; exit 1; fi
    fi
    if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: run as root (sudo systemd/install.sh)" >&2; exit 1
    fi
}

install_packages() {
    step "Debian packages: the interpreter (python3 3.11), venv, picamera2 with Debian's numpy 1.24"
    run apt-get update
    run apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-numpy \
        python3-picamera2 sqlite3
}

install_source() {
    step "copy the repository to $SRC (no .git, no venv)"
    run install -d -m 0755 "$PREFIX" "$SRC"
    run tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs --exclude='*.pyc' -cf "$PREFIX/src.tar" .
    run tar -C "$SRC" -xf "$PREFIX/src.tar"
    run rm -f "$PREFIX/src.tar"
}

install_venv() {
    step "virtual environment with --system-site-packages (sees apt's picamera2 and numpy 1.24)"
    run python3 -m venv --system-site-packages "$VENV"
    printf '%s\n' "$CONSTRAINTS" | write_file "$PREFIX/constraints.txt" 0644
    run "$VENV/bin/pip" install --no-cache-dir --constraint "$PREFIX/constraints.txt" "$SRC[edge]"
    step "check the numpy trap: Debian's numpy 1.x, OpenCV, LiteRT and picamera2 import together"
    run "$VENV/bin/python" -c "import numpy, cv2, picamera2; from ai_edge_litert.interpreter import Interpreter; \
assert numpy.__version__.startswith('1.'), numpy.__version__; print('numpy', numpy.__version__, 'cv2', cv2.__version__)"
}

create_user() {
    step "service user $SERVICE_USER in the video (camera) and dialout (serial) groups"
    if id "$SERVICE_USER" >/dev/null 2>&1; then
        run usermod -a -G video,dialout "$SERVICE_USER"
    else
        run useradd --system --user-group --groups video,dialout --home-dir /var/lib/hematovision \
            --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
}

install_config() {
    step "configuration $CONF_DIR/config.toml (an existing one is kept)"
    run install -d -m 0755 "$CONF_DIR"
    if [ -e "$CONF_DIR/config.toml" ]; then
        echo "   $CONF_DIR/config.toml exists: kept; compare with $SRC/systemd/config.example.toml"
    else
        sed -e "s#\"\\.\\./samples/#\"$SRC/samples/#" -e "s#^bundle = \"\"#bundle = \"$SRC/models/reference\"#" \
            "$REPO/systemd/config.example.toml" \
            | write_file "$CONF_DIR/config.toml" 0644
    fi
}

install_unit() {
    step "systemd unit $UNIT_DIR/$SERVICE"
    sed -e "s#/opt/hematovision#$PREFIX#g" "$REPO/systemd/$SERVICE" | write_file "$UNIT_DIR/$SERVICE" 0644
    run "$VENV/bin/hematovision-edge" check-config --config "$CONF_DIR/config.toml"
    run systemctl daemon-reload
    if [ "$ENABLE" -eq 1 ]; then
        run systemctl enable --now "$SERVICE"
    else
        echo "   not enabled (--no-enable): systemctl enable --now $SERVICE"
    fi
}

boot_config() {
    if [ -e /boot/firmware/config.txt ] || [ "$DRY_RUN" -eq 1 ]; then echo /boot/firmware/config.txt; else echo /boot/config.txt; fi
}

setup_usb_gadget() {
    step "USB gadget serial: dtoverlay=dwc2 and g_serial give /dev/ttyGS0 on the USB-C port (after a reboot)"
    local config
    config="$(boot_config)"
    if [ "$DRY_RUN" -eq 0 ] && grep -q '^dtoverlay=dwc2' "$config"; then
        echo "   $config already has dtoverlay=dwc2"
    else
        run sh -c "printf '\n[all]\ndtoverlay=dwc2\n' >> $config"
    fi
    printf 'dwc2\ng_serial\n' | write_file /etc/modules-load.d/hematovision-gadget.conf 0644
    echo "   then set report.port = \"/dev/ttyGS0\" and report.link in $CONF_DIR/config.toml, and reboot"
}

main() {
    if [ "$DRY_RUN" -eq 1 ]; then echo "install.sh: dry run, nothing is changed"; fi
    check_system
    install_packages
    install_source
    install_venv
    create_user
    install_config
    install_unit
    if [ "$USB_GADGET" -eq 1 ]; then setup_usb_gadget; fi
    step "done: journalctl -u $SERVICE -f shows the daemon; systemctl status $SERVICE its specimen and count"
}

main
