#!/usr/bin/env bash
# Build and test the rig firmware.
#
#   build.sh host-test [VECTORS]  compile the portable C (rig/) with the host gcc
#                                 (-std=c99 -Wall -Wextra -Werror) and run the host
#                                 tests against the golden vectors (default:
#                                 ../../protocol/tests/vectors/serial.tsv)
#   build.sh avr                  compile the sketch for the Arduino Mega 2560
#                                 (ATmega2560) with plain avr-gcc + avr-libc, no
#                                 Arduino core; writes rig_firmware.hex and prints
#                                 flash and RAM use
#   build.sh avr-sim              build.sh avr, then run the firmware in the simavr
#                                 ATmega2560 simulator (test/sim_avr.c): the host
#                                 on the UART, the lever, lick and frame clock on
#                                 the pins; checks timing, pins and throughput
#   build.sh all                  host-test and avr
#
# Needs: host-test: gcc. avr: gcc-avr, avr-libc, binutils-avr
# (Debian/Ubuntu: apt-get install -y gcc-avr avr-libc binutils-avr).
# avr-sim: also libsimavr-dev (optional; apt-get install -y libsimavr-dev).
#
# Environment: RIG_BUILD_DIR (default: ./build next to this script), CC (host
# compiler, default gcc), AVR_CC / AVR_CXX / AVR_OBJCOPY / AVR_SIZE,
# RIG_SANITIZE=0 to skip the sanitizers in host-test, RIG_AVR_DEFINES for extra
# -D flags of the AVR build (e.g. "-DRIG_HARD_MAX_VALVE_OPEN_MS=500").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${RIG_BUILD_DIR:-$here/build}"
rig="$here/rig"

die() {
    echo "build.sh: $*" >&2
    exit 1
}

host_test() {
    local vectors="${1:-${RIG_VECTORS:-$here/../../protocol/tests/vectors/serial.tsv}}"
    local cc="${CC:-gcc}"
    local out="$build/host"
    command -v "$cc" >/dev/null 2>&1 || die "host compiler '$cc' not found (install gcc)"
    [ -f "$vectors" ] || die "golden vectors not found: $vectors"
    mkdir -p "$out"

    local flags=(-std=c99 -Wall -Wextra -Werror -pedantic -O1 -g -I"$rig" -I"$here/test")
    # the portable code gets stricter warnings than the tests
    local libflags=(-Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wcast-qual -Wconversion)
    local san=()
    if [ "${RIG_SANITIZE:-1}" != 0 ]; then
        # Use ASan/UBSan where they work (some containers forbid ASan).
        printf 'int main(void){return 0;}\n' >"$out/probe.c"
        if "$cc" -fsanitize=address,undefined -fno-sanitize-recover=all \
            -o "$out/probe" "$out/probe.c" >/dev/null 2>&1 && "$out/probe" >/dev/null 2>&1; then
            san=(-fsanitize=address,undefined -fno-sanitize-recover=all)
        elif "$cc" -fsanitize=undefined -fno-sanitize-recover=all \
            -o "$out/probe" "$out/probe.c" >/dev/null 2>&1 && "$out/probe" >/dev/null 2>&1; then
            san=(-fsanitize=undefined -fno-sanitize-recover=all)
        fi
    fi
    echo "host-test: $("$cc" --version | head -n 1), sanitizers: ${san[*]:-none}"

    local f
    for f in rigproto rigdevice; do
        "$cc" "${flags[@]}" "${libflags[@]}" "${san[@]}" -c "$rig/$f.c" -o "$out/$f.o"
    done
    "$cc" "${flags[@]}" "${san[@]}" -o "$out/test_rigproto" \
        "$here/test/test_rigproto.c" "$out/rigproto.o"
    "$cc" "${flags[@]}" "${san[@]}" -o "$out/test_rigdevice" \
        "$here/test/test_rigdevice.c" "$out/rigdevice.o" "$out/rigproto.o"

    local status=0
    echo "== test_rigproto $vectors"
    "$out/test_rigproto" "$vectors" || status=1
    echo "== test_rigdevice"
    "$out/test_rigdevice" || status=1
    if [ "$status" != 0 ]; then
        die "host tests FAILED"
    fi
    echo "host-test: all passed"
}

avr() {
    local cc="${AVR_CC:-avr-gcc}" cxx="${AVR_CXX:-avr-g++}"
    local objcopy="${AVR_OBJCOPY:-avr-objcopy}" size="${AVR_SIZE:-avr-size}"
    local out="$build/avr"
    local tool
    for tool in "$cc" "$cxx" "$objcopy" "$size"; do
        command -v "$tool" >/dev/null 2>&1 ||
            die "'$tool' not found (Debian/Ubuntu: apt-get install -y gcc-avr avr-libc binutils-avr)"
    done
    mkdir -p "$out"

    # shellcheck disable=SC2206 # word splitting of RIG_AVR_DEFINES is intended
    local common=(-mmcu=atmega2560 -DF_CPU=16000000UL -Os -g -Wall -Wextra -Werror
        -ffunction-sections -fdata-sections -I"$rig" ${RIG_AVR_DEFINES:-})
    echo "avr: $("$cc" --version | head -n 1)"
    local f
    for f in rigproto rigdevice; do
        "$cc" "${common[@]}" -std=c99 -c "$rig/$f.c" -o "$out/$f.o"
    done
    "$cxx" "${common[@]}" -std=gnu++11 -fno-exceptions -fno-rtti -fno-threadsafe-statics \
        -x c++ -c "$here/rig_firmware/rig_firmware.ino" -o "$out/rig_firmware.o"
    "$cc" -mmcu=atmega2560 -Os -Wl,--gc-sections -o "$out/rig_firmware.elf" \
        "$out/rig_firmware.o" "$out/rigproto.o" "$out/rigdevice.o"
    "$objcopy" -O ihex -R .eeprom "$out/rig_firmware.elf" "$out/rig_firmware.hex"

    # Berkeley format: text data bss. Flash holds text + data (the initial
    # values of data); RAM holds data + bss before the stack.
    local text data bss
    read -r text data bss _ < <("$size" -B "$out/rig_firmware.elf" | tail -n 1)
    local flash=$((text + data)) ram=$((data + bss))
    echo "avr: $out/rig_firmware.hex"
    awk -v f="$flash" -v r="$ram" 'BEGIN {
        printf "avr size: flash %d bytes (%.1f%% of 262144, 256 KiB; the bootloader keeps 8 KiB)\n", f, 100 * f / 262144
        printf "avr size: RAM   %d bytes (%.1f%% of 8192, 8 KiB; the rest is stack)\n", r, 100 * r / 8192
    }'
    if [ "$flash" -gt $((262144 - 8192)) ] || [ "$ram" -gt 6144 ]; then
        die "the firmware does not fit comfortably (flash $flash, RAM $ram)"
    fi
}

avr_sim() {
    local cc="${CC:-gcc}"
    local cflags
    if pkg-config --exists simavr 2>/dev/null; then
        cflags="$(pkg-config --cflags simavr)"
    elif [ -f /usr/include/simavr/sim_avr.h ]; then
        cflags="-I/usr/include/simavr"
    else
        die "simavr headers not found (Debian/Ubuntu: apt-get install -y libsimavr-dev)"
    fi
    avr
    local out="$build/sim"
    mkdir -p "$out"
    # shellcheck disable=SC2086 # cflags is a list of flags
    "$cc" -std=gnu99 -O1 -g -Wall -Wextra $cflags -I"$rig" -I"$here/test" -o "$out/sim_avr" \
        "$here/test/sim_avr.c" "$rig/rigproto.c" -lsimavr
    echo "== sim_avr $build/avr/rig_firmware.elf"
    "$out/sim_avr" "$build/avr/rig_firmware.elf" || die "simulated firmware checks FAILED"
    echo "avr-sim: all passed"
}

case "${1:-}" in
host-test)
    shift
    host_test "$@"
    ;;
avr)
    avr
    ;;
avr-sim)
    avr_sim
    ;;
all)
    shift
    host_test "$@"
    avr
    ;;
*)
    echo "usage: $0 host-test [VECTORS] | avr | avr-sim | all" >&2
    exit 2
    ;;
esac
