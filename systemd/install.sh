#!/usr/bin/env bash
# Install the Hematovision edge daemon on 64-bit Raspberry Pi OS Bookworm or Trixie, from this repository.
#
#   sudo systemd/install.sh [--dry-run] [--source KIND] [--operator USER] [--usb-gadget] [--no-enable] [--prefix DIR]
#
#   --dry-run          print every step and change nothing (no root needed)
#   --source KIND      the frames counted: auto (default: picamera2 when a Raspberry Pi camera is detected, else
#                      the first USB camera), picamera2, opencv (--video-device, default the first USB camera),
#                      or replay (a demo: counts the 34 sample fields once, no camera)
#   --video-device DEV the V4L2 camera of --source opencv, e.g. /dev/video0
#   --operator USER    the account that reads the reports (joins group hematovision; default: the user who ran
#                      sudo, else pi)
#   --usb-gadget       also set up USB gadget serial (dtoverlay=dwc2, g_serial): /dev/ttyGS0 for report links
#   --no-enable        install, but do not enable or start the service
#   --prefix DIR       where the source copy and the virtual environment go (default /opt/hematovision)
#   --os-release FILE  the system's description (default /etc/os-release): see the steps for another release
#
# The numpy trap: the picamera2 stack (python3-picamera2, python3-libcamera, simplejpeg, python3-av) is built
# against Debian's numpy, and a venv made with --system-site-packages sees it. A wheel that pulls in another
# numpy shadows Debian's, and picamera2's compiled modules fail to import. So the venv keeps Debian's numpy and
# each release gets the newest OpenCV and LiteRT wheels that accept it:
#   Bookworm (Debian 12, Python 3.11, numpy 1.24): numpy<2, opencv-python-headless 4.11.0.86 (the last to accept
#     numpy 1.x), ai-edge-litert 1.4.0.
#   Trixie (Debian 13, Python 3.13, numpy 2.2): numpy<2.3, opencv-python-headless 4.12.0.88 (numpy>=2,<2.3),
#     ai-edge-litert 2.3.0 (LiteRT has cp313 wheels from 2.1 on).
#
# Checked only on a Pi (the dry run cannot): the camera detection, picamera2 importing beside the pinned wheels,
# and the service reaching READY with the camera.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/hematovision
CONF_DIR=/etc/hematovision
UNIT_DIR=/etc/systemd/system
BIN_DIR=/usr/local/bin
SERVICE=hematovision.service
SERVICE_USER=hematovision
STATE_DIR=/var/lib/hematovision
OS_RELEASE=/etc/os-release
# Where cameras are listed; another folder only for the tests of this script.
V4L_SYSFS="${HEMATOVISION_V4L_SYSFS:-/sys/class/video4linux}"
DRY_RUN=0
USB_GADGET=0
ENABLE=1
SOURCE=auto
VIDEO_DEVICE=""
OPERATOR=""

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --usb-gadget) USB_GADGET=1 ;;
        --no-enable) ENABLE=0 ;;
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift ;;
        --source) SOURCE="${2:?--source needs auto, picamera2, opencv or replay}"; shift ;;
        --video-device) VIDEO_DEVICE="${2:?--video-device needs a device, e.g. /dev/video0}"; shift ;;
        --operator) OPERATOR="${2:?--operator needs a user name}"; shift ;;
        --os-release) OS_RELEASE="${2:?--os-release needs a file}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$SOURCE" in
    auto|picamera2|opencv|replay) ;;
    *) echo "install.sh: --source $SOURCE: use auto, picamera2, opencv or replay" >&2; exit 2 ;;
esac
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

# The release's pins (CONSTRAINTS) and the numpy major version its picamera2 stack is built against.
release_pins() {
    case "$1" in
        bookworm)
            NUMPY_MAJOR=1
            CONSTRAINTS="numpy<2
opencv-python-headless==4.11.0.86
ai-edge-litert==1.4.0
pyserial==3.5" ;;
        trixie)
            NUMPY_MAJOR=2
            CONSTRAINTS="numpy<2.3
opencv-python-headless==4.12.0.88
ai-edge-litert==2.3.0
pyserial==3.5" ;;
        *) return 1 ;;
    esac
}

check_system() {
    local codename name arch
    codename="$(. "$OS_RELEASE" 2>/dev/null && echo "${VERSION_CODENAME:-unknown}")" || codename=unknown
    name="$(. "$OS_RELEASE" 2>/dev/null && echo "${PRETTY_NAME:-$codename}")" || name=unknown
    if ! release_pins "$codename"; then
        echo "install.sh: this is $name ($codename, from $OS_RELEASE); supported: Raspberry Pi OS Bookworm" \
            "(Debian 12) and Trixie (Debian 13), 64-bit; to see the steps for one of them, add --dry-run" \
            "--os-release FILE" >&2
        exit 1
    fi
    RELEASE="$codename"
    step "check the system: $name, 64-bit, root"
    arch="$(uname -m)"
    if [ "$arch" != aarch64 ]; then
        echo "warning: this is $arch; the script is made for a Raspberry Pi 4 or 5 (aarch64)" >&2
        if [ "$DRY_RUN" -eq 0 ]; then echo "install.sh: refusing to install here; use --dry-run to see the steps" >&2; exit 1; fi
    fi
    if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: run as root (sudo systemd/install.sh)" >&2; exit 1
    fi
}

install_packages() {
    step "Debian packages: the interpreter, venv, picamera2 with Debian's numpy $NUMPY_MAJOR.x"
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
    step "virtual environment with --system-site-packages (sees apt's picamera2 and numpy $NUMPY_MAJOR.x), pins for $RELEASE"
    run python3 -m venv --system-site-packages "$VENV"
    printf '%s\n' "$CONSTRAINTS" | write_file "$PREFIX/constraints.txt" 0644
    run "$VENV/bin/pip" install --no-cache-dir --constraint "$PREFIX/constraints.txt" "$SRC[edge]"
    step "check the numpy trap: Debian's numpy $NUMPY_MAJOR.x, OpenCV, LiteRT and picamera2 import together"
    run "$VENV/bin/python" -c "import numpy, cv2, picamera2; from ai_edge_litert.interpreter import Interpreter; \
assert numpy.__version__.startswith('$NUMPY_MAJOR.'), numpy.__version__; print('numpy', numpy.__version__, 'cv2', cv2.__version__)"
}

install_commands() {
    step "commands on PATH: $BIN_DIR/hematovision-edge and hematovision-calibrate"
    local command
    for command in hematovision-edge hematovision-calibrate; do
        run ln -sfn "$VENV/bin/$command" "$BIN_DIR/$command"
    done
}

create_user() {
    step "service user $SERVICE_USER in the video (camera) and dialout (serial) groups"
    if id "$SERVICE_USER" >/dev/null 2>&1; then
        run usermod -a -G video,dialout "$SERVICE_USER"
    else
        run useradd --system --user-group --groups video,dialout --home-dir "$STATE_DIR" \
            --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
}

# The account that reads the reports: --operator, else the user who ran sudo, else pi (where it exists).
find_operator() {
    if [ -n "$OPERATOR" ]; then echo "$OPERATOR"; return; fi
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then echo "$SUDO_USER"; return; fi
    if id pi >/dev/null 2>&1; then echo pi; fi
}

add_operator() {
    step "reports readable without sudo: group $SERVICE_USER may read $STATE_DIR/reports (the unit's UMask=0027)"
    OPERATOR="$(find_operator)"
    if [ -z "$OPERATOR" ]; then
        echo "   no operator account found: add one later with  sudo usermod -a -G $SERVICE_USER NAME"
        return
    fi
    if [ "$DRY_RUN" -eq 0 ] && ! id "$OPERATOR" >/dev/null 2>&1; then
        echo "install.sh: --operator $OPERATOR: no such user; give an existing account" >&2; exit 1
    fi
    run usermod -a -G "$SERVICE_USER" "$OPERATOR"
}

# The first USB (V4L2) camera: a /dev/videoN whose device hangs on USB and is the camera's first node (the
# Pi's own codec and ISP nodes are not on USB, a UVC camera's second node is its metadata).
first_usb_camera() {
    local node
    for node in "$V4L_SYSFS"/video*; do
        [ -e "$node" ] || continue
        [ "$(cat "$node/index" 2>/dev/null || echo 0)" = 0 ] || continue
        case "$(readlink -f "$node/device" 2>/dev/null)" in
            */usb*) echo "/dev/$(basename "$node")"; return ;;
        esac
    done
}

# A Raspberry Pi camera that libcamera lists (apt's python3-picamera2, the system's python3).
pi_camera_present() {
    python3 -c "from picamera2 import Picamera2; import sys; sys.exit(0 if Picamera2.global_camera_info() else 1)" \
        >/dev/null 2>&1
}

# Sets SOURCE_KIND, VIDEO_DEVICE and SOURCE_WHY from --source and what is connected.
choose_source() {
    SOURCE_KIND="$SOURCE"
    case "$SOURCE" in
        replay) SOURCE_WHY="demo: replays the sample fields once, no camera (--source replay)" ;;
        picamera2) SOURCE_WHY="a Raspberry Pi camera (--source picamera2)" ;;
        opencv)
            VIDEO_DEVICE="${VIDEO_DEVICE:-$(first_usb_camera)}"
            VIDEO_DEVICE="${VIDEO_DEVICE:-/dev/video0}"
            SOURCE_WHY="the USB camera $VIDEO_DEVICE (--source opencv)" ;;
        auto)
            if pi_camera_present; then
                SOURCE_KIND=picamera2; SOURCE_WHY="a Raspberry Pi camera was detected"
            elif VIDEO_DEVICE="${VIDEO_DEVICE:-$(first_usb_camera)}" && [ -n "$VIDEO_DEVICE" ]; then
                SOURCE_KIND=opencv; SOURCE_WHY="the USB camera $VIDEO_DEVICE was detected"
            else
                SOURCE_KIND=picamera2; CAMERA_MISSING=1
                SOURCE_WHY="no camera detected: picamera2 (a Raspberry Pi camera) until one is connected"
            fi ;;
    esac
}

install_config() {
    step "configuration $CONF_DIR/config.toml (an existing one is kept)"
    run install -d -m 0755 "$CONF_DIR"
    if [ -e "$CONF_DIR/config.toml" ]; then
        CONFIG_KEPT=1
        echo "   $CONF_DIR/config.toml exists: kept, with its source; compare with $SRC/systemd/config.example.toml"
        return
    fi
    choose_source
    echo "   frames from: $SOURCE_KIND ($SOURCE_WHY)"
    {
        echo "# Written by systemd/install.sh: source.kind = \"$SOURCE_KIND\" ($SOURCE_WHY)."
        sed -e "s#\"\\.\\./samples/#\"$SRC/samples/#" \
            -e "s#^kind = \"replay\" #kind = \"$SOURCE_KIND\" #" \
            -e "s#^device = \"/dev/video0\"#device = \"${VIDEO_DEVICE:-/dev/video0}\"#" \
            -e "s#^directory = \"\" #directory = \"$STATE_DIR\" #" \
            "$REPO/systemd/config.example.toml"
    } | write_file "$CONF_DIR/config.toml" 0644
}

install_unit() {
    step "systemd unit $UNIT_DIR/$SERVICE"
    sed -e "s#/opt/hematovision#$PREFIX#g" "$REPO/systemd/$SERVICE" | write_file "$UNIT_DIR/$SERVICE" 0644
    run systemctl daemon-reload
    if [ "${CAMERA_MISSING:-0}" -eq 1 ]; then
        echo "   no camera yet: the service is enabled but not started, and check-config waits for the camera"
        if [ "$ENABLE" -eq 1 ]; then run systemctl enable "$SERVICE"; fi
        return
    fi
    run "$VENV/bin/hematovision-edge" check-config --config "$CONF_DIR/config.toml"
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

# What to do next, by what was installed.
next_steps() {
    local first
    if [ "${CONFIG_KEPT:-0}" -eq 1 ]; then
        first="the configuration was kept: its [source] decides what is counted; after a change: sudo systemctl restart $SERVICE"
    elif [ "${CAMERA_MISSING:-0}" -eq 1 ]; then
        first="connect the camera, then: sudo hematovision-edge check-config --config $CONF_DIR/config.toml && sudo systemctl start $SERVICE (a USB camera: set [source] kind = \"opencv\" first)"
    elif [ "$SOURCE_KIND" = replay ]; then
        first="this is the DEMO: it counts the sample fields once and stops. To count from the camera: sudo systemd/install.sh --source auto after deleting $CONF_DIR/config.toml, or set [source] kind in it and sudo systemctl restart $SERVICE"
    elif [ "$ENABLE" -eq 0 ]; then
        first="start counting: sudo systemctl enable --now $SERVICE"
    else
        first="the service counts from $SOURCE_KIND now; calibrate the microscope (hematovision-calibrate, see the README) and set calibration.profile"
    fi
    step "done. Next: $first"
    echo "   the web page (live view, specimen entry, review and sign-off): http://127.0.0.1:8080 on this machine; from a desktop: ssh -L 8080:127.0.0.1:8080 THIS-PI, then the same address"
    echo "   specimens start by themselves (specimen.auto_start), on the web page, or: hematovision-edge specimen start --id ID [--wbc X] --config $CONF_DIR/config.toml"
    echo "   watch it: the web page, hematovision-edge specimen status --config $CONF_DIR/config.toml, or journalctl -u $SERVICE -f (the log)"
    if [ -n "$OPERATOR" ]; then
        echo "   reports: $STATE_DIR/reports, readable by $OPERATOR after logging in again (group $SERVICE_USER)"
    else
        echo "   reports: $STATE_DIR/reports, readable by members of group $SERVICE_USER (sudo usermod -a -G $SERVICE_USER NAME)"
    fi
}

main() {
    if [ "$DRY_RUN" -eq 1 ]; then echo "install.sh: dry run, nothing is changed"; fi
    check_system
    install_packages
    install_source
    install_venv
    install_commands
    create_user
    add_operator
    install_config
    install_unit
    if [ "$USB_GADGET" -eq 1 ]; then setup_usb_gadget; fi
    next_steps
}

main
