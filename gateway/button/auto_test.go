package button

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/testutil/uinput"
)

// Nodes that are not evdev devices (a FIFO, a regular file and a character
// device that is not evdev, named like event nodes) are left alone.
func TestAutoInputIgnoresNonEvdev(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, "event0"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "event1"), []byte("not a device"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", filepath.Join(dir, "event2")); err != nil {
		t.Fatal(err)
	}
	// (A FIFO opened read-only would block until a writer came: it must not
	// be opened at all, or this test hangs.)
	a, err := OpenAutoInput(dir, KeyWPSButton, NativeLayout(), 10*time.Millisecond, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	time.Sleep(50 * time.Millisecond) // a few rescans
	if d := a.Devices(); len(d) != 0 {
		t.Errorf("devices in use %v, want none", d)
	}
	// No input directory yet (no input device ever): not an error.
	b, err := OpenAutoInput(filepath.Join(dir, "missing"), KeyWPSButton, NativeLayout(), time.Second, discard())
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
}

// TestRealAutoInput: the auto source finds a device that has the key when
// it is plugged in, not one without it nor a Bluetooth one, reads its
// presses, and voids a press when the device is unplugged mid-press. Needs
// uinput: on a kernel without it this skips, and the appliance boot test
// runs it inside the VM.
func TestRealAutoInput(t *testing.T) {
	if ok, why := uinput.Available(); !ok {
		t.Skipf("skipping: %s; the appliance boot test (images/boottest) runs this test inside its VM", why)
	}
	a, err := OpenAutoInput("/dev/input", KeyWPSButton, NativeLayout(), 20*time.Millisecond, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	wps := uinput.NewOnBus(t, uinput.BusUSB, "bastion-auto-wps", KeyWPSButton)
	other := uinput.NewOnBus(t, uinput.BusUSB, "bastion-auto-other", 30)
	radio := uinput.NewOnBus(t, uinput.BusBluetooth, "bastion-auto-bt", KeyWPSButton)
	in := func(d *uinput.Device) bool { return slices.Contains(a.Devices(), d.EventPath()) }
	for deadline := time.Now().Add(5 * time.Second); !in(wps); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the WPS device %s was not picked up within 5s (in use: %v)", wps.EventPath(), a.Devices())
		}
	}
	if in(other) || in(radio) {
		t.Errorf("devices in use %v include the one without the key (%s) or the Bluetooth one (%s)", a.Devices(), other.EventPath(), radio.EventPath())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, v := range []int32{1, 0} {
		if err := radio.Key(KeyWPSButton, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []int32{1, 0, 1} {
		if err := wps.Key(KeyWPSButton, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []bool{true, false, true} {
		e, err := a.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Reset || e.Pressed != want {
			t.Fatalf("edge %+v, want pressed=%v (and nothing from the Bluetooth device)", e, want)
		}
	}
	wps.Destroy() // unplugged while held
	// The kernel releases a held key as it unregisters the device; then
	// the device is gone.
	e, err := a.Next(ctx)
	if err == nil && !e.Reset && !e.Pressed {
		e, err = a.Next(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	if !e.Reset {
		t.Fatalf("after unplugging mid-press: %+v, want (a release, then) a Reset edge", e)
	}
	if in(wps) {
		t.Errorf("the unplugged device is still in use: %v", a.Devices())
	}
}
