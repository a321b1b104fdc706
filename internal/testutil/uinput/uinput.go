// Package uinput makes real Linux input devices for tests through
// /dev/uinput: a virtual keyboard whose key presses the kernel delivers
// on a /dev/input/eventN node, timestamped by the kernel, exactly as a
// physical button's would be. It is test-only and never used by the daemon.
//
// It skips the test, saying why, when the running kernel has no uinput
// driver (CONFIG_INPUT_UINPUT): no package the test command can install
// provides a kernel driver, so that is the one requirement a strict run
// (BASTION_REQUIRE_ALL=1) cannot turn into a failure.
package uinput

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers of include/uapi/linux/uinput.h, which x/sys/unix lacks.
const (
	uiDevCreate  = 0x5501     // _IO('U', 1)
	uiDevDestroy = 0x5502     // _IO('U', 2)
	uiDevSetup   = 0x405c5503 // _IOW('U', 3, struct uinput_setup), 92 bytes
	uiSetEvBit   = 0x40045564 // _IOW('U', 100, int)
	uiSetKeyBit  = 0x40045565 // _IOW('U', 101, int)
	uiGetSysname = 0x8050552c // _IOC(_IOC_READ, 'U', 44, 80)

	evSyn = 0
	evKey = 1

	miscMajor   = 10
	uinputMinor = 223
)

// uinputSetup is struct uinput_setup.
type uinputSetup struct {
	bustype, vendor, product, version uint16
	name                              [80]byte
	ffEffectsMax                      uint32
}

// Device is a virtual keyboard.
type Device struct {
	f         *os.File
	eventPath string
	destroy   sync.Once
}

// Bus types (include/uapi/linux/input.h) a device can claim.
const (
	BusUSB       = 0x03
	BusBluetooth = 0x05
	BusVirtual   = 0x06
)

// Available reports whether the kernel has the uinput driver, and if not,
// why.
func Available() (bool, string) {
	misc, err := os.ReadFile("/proc/misc")
	if err != nil {
		return false, "cannot read /proc/misc: " + err.Error()
	}
	for _, line := range strings.Split(string(misc), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[1] == "uinput" {
			return true, ""
		}
	}
	return false, "the running kernel has no uinput driver (no 'uinput' in /proc/misc; CONFIG_INPUT_UINPUT is off or the module is not loadable here)"
}

// New creates a virtual keyboard that can send the given key codes and
// returns it once its /dev/input/eventN node can be opened. The device is
// destroyed at the end of the test.
func New(t testing.TB, name string, keys ...uint16) *Device {
	t.Helper()
	return NewOnBus(t, BusVirtual, name, keys...)
}

// NewOnBus is New for a device that says it is on bus.
func NewOnBus(t testing.TB, bus uint16, name string, keys ...uint16) *Device {
	t.Helper()
	if ok, why := Available(); !ok {
		t.Skipf("skipping real input device test: %s; the pipe test covers the same decoder here, and the appliance boot test (images/boottest) runs this test inside its VM", why)
	}
	f, err := openUinput(t)
	if err != nil {
		t.Skipf("skipping real input device test: %v", err)
	}
	d := &Device{f: f}
	t.Cleanup(d.Destroy)
	if err := d.ioctl(uiSetEvBit, evKey); err != nil {
		t.Fatalf("UI_SET_EVBIT EV_KEY: %v", err)
	}
	for _, k := range keys {
		if err := d.ioctl(uiSetKeyBit, uintptr(k)); err != nil {
			t.Fatalf("UI_SET_KEYBIT %#x: %v", k, err)
		}
	}
	var setup uinputSetup
	setup.bustype, setup.vendor, setup.product, setup.version = bus, 0xb457, 0x0001, 1
	copy(setup.name[:], name)
	if unsafe.Sizeof(setup) != 92 {
		t.Fatalf("struct uinput_setup is %d bytes here, want 92", unsafe.Sizeof(setup))
	}
	if err := d.ioctl(uiDevSetup, uintptr(unsafe.Pointer(&setup))); err != nil {
		t.Fatalf("UI_DEV_SETUP: %v", err)
	}
	if err := d.ioctl(uiDevCreate, 0); err != nil {
		t.Fatalf("UI_DEV_CREATE: %v", err)
	}
	var sysname [80]byte
	if err := d.ioctl(uiGetSysname, uintptr(unsafe.Pointer(&sysname))); err != nil {
		t.Fatalf("UI_GET_SYSNAME: %v", err)
	}
	sys := filepath.Join("/sys/devices/virtual/input", string(bytes.TrimRight(sysname[:], "\x00")))
	d.eventPath, err = eventNode(t, sys)
	if err != nil {
		t.Fatalf("find event node of %s: %v", sys, err)
	}
	return d
}

// openUinput opens /dev/uinput, making the node in a temporary directory
// if /dev has none (no udev or devtmpfs entry) and the test runs as root.
func openUinput(t testing.TB) (*os.File, error) {
	f, err := os.OpenFile("/dev/uinput", os.O_WRONLY, 0)
	if err == nil {
		return f, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open /dev/uinput: %w", err)
	}
	node := filepath.Join(t.TempDir(), "uinput")
	if err := unix.Mknod(node, unix.S_IFCHR|0o600, int(unix.Mkdev(miscMajor, uinputMinor))); err != nil {
		return nil, fmt.Errorf("no /dev/uinput and cannot make one (needs root): %w", err)
	}
	return os.OpenFile(node, os.O_WRONLY, 0)
}

// eventNode finds the evdev child of an input device in sysfs and returns
// a path that opens it, making the node if /dev/input lacks it. The
// kernel registers the child synchronously in UI_DEV_CREATE, so no
// waiting is needed.
func eventNode(t testing.TB, sys string) (string, error) {
	entries, err := os.ReadDir(sys)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "event") {
			continue
		}
		if p := "/dev/input/" + e.Name(); fileExists(p) {
			return p, nil
		}
		dev, err := os.ReadFile(filepath.Join(sys, e.Name(), "dev"))
		if err != nil {
			return "", err
		}
		maj, min, ok := strings.Cut(strings.TrimSpace(string(dev)), ":")
		if !ok {
			return "", fmt.Errorf("unexpected dev file %q", dev)
		}
		a, err1 := strconv.Atoi(maj)
		b, err2 := strconv.Atoi(min)
		if err1 != nil || err2 != nil {
			return "", fmt.Errorf("unexpected dev file %q", dev)
		}
		node := filepath.Join(t.TempDir(), e.Name())
		if err := unix.Mknod(node, unix.S_IFCHR|0o600, int(unix.Mkdev(uint32(a), uint32(b)))); err != nil {
			return "", fmt.Errorf("mknod %s: %w", node, err)
		}
		return node, nil
	}
	return "", fmt.Errorf("no event* child under %s", sys)
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// Destroy unplugs the device (its event node goes away).
func (d *Device) Destroy() {
	d.destroy.Do(func() {
		d.ioctl(uiDevDestroy, 0)
		d.f.Close()
	})
}

// EventPath is the evdev node the kernel delivers this device's events on.
func (d *Device) EventPath() string { return d.eventPath }

// Key sends EV_KEY code=value (1 press, 0 release) and a SYN_REPORT. The
// kernel stamps the events with its own clock.
func (d *Device) Key(code uint16, value int32) error {
	var b []byte
	b = appendEvent(b, evKey, code, value)
	b = appendEvent(b, evSyn, 0, 0)
	_, err := d.f.Write(b)
	return err
}

// appendEvent encodes a struct input_event for the running word size; it
// is written independently of the decoder under test.
func appendEvent(b []byte, typ, code uint16, value int32) []byte {
	ne := binary.NativeEndian
	if unsafe.Sizeof(uintptr(0)) == 8 {
		b = append(b, make([]byte, 16)...)
	} else {
		b = append(b, make([]byte, 8)...)
	}
	b = ne.AppendUint16(b, typ)
	b = ne.AppendUint16(b, code)
	return ne.AppendUint32(b, uint32(value))
}

func (d *Device) ioctl(req, arg uintptr) error {
	sc, err := d.f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := sc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}
