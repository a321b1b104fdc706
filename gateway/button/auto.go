package button

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AutoInput is a Source over every evdev device that has the key: a router's
// gpio-keys device with KEY_WPS_BUTTON, or the keyboard attached to a PC
// appliance, whichever event node number it got and whenever it is plugged
// in. Devices are found by scanning the input directory (at start and every
// rescan interval) and asking each node which keys it has (EVIOCGBIT);
// a device that goes away is dropped and found again if it comes back.
// Bluetooth devices are never used: a press must be physical presence, and a
// radio keyboard can be out of sight.
type AutoInput struct {
	dir    string
	code   uint16
	layout Layout
	log    *slog.Logger

	edges  chan Edge
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	open   map[string]*InputSource // by path
	closed bool

	// rejected remembers the nodes looked at and not used, by path, with
	// the change time they had then: a rescan opens a node again only if
	// it was made anew (another device got its number). Scan goroutine only.
	rejected map[string]time.Time
}

// OpenAutoInput starts watching dir (normally /dev/input) for devices with
// key code. It does not fail when none is there yet, nor dir: the kernel
// makes /dev/input with the first input device, which may be a keyboard
// plugged in later.
func OpenAutoInput(dir string, code uint16, l Layout, rescan time.Duration, log *slog.Logger) (*AutoInput, error) {
	if !l.valid() {
		return nil, fmt.Errorf("auto input %s: layout %d: want 16 or 24", dir, int(l))
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &AutoInput{dir: dir, code: code, layout: l, log: log, edges: make(chan Edge, 16), cancel: cancel,
		open: map[string]*InputSource{}, rejected: map[string]time.Time{}}
	a.scan(ctx)
	if len(a.Devices()) == 0 {
		a.log.Warn("button: no input device has the pairing key yet; watching for one", "dir", dir, "key_code", code,
			"hint", "plug in a keyboard with the key, or set pairing.input to the button's evdev node or a FIFO (OpenWrt's gpio-button-hotplug does not make input devices)")
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		t := time.NewTicker(rescan)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				a.scan(ctx)
			case <-ctx.Done():
				return
			}
		}
	}()
	return a, nil
}

// Name lists the devices in use.
func (a *AutoInput) Name() string {
	names := a.Devices()
	for i, p := range names {
		names[i] = filepath.Base(p)
	}
	return "auto:" + a.dir + "[" + strings.Join(names, ",") + "]"
}

// Devices returns the paths of the devices in use.
func (a *AutoInput) Devices() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	ps := make([]string, 0, len(a.open))
	for p := range a.open {
		ps = append(ps, p)
	}
	slices.Sort(ps)
	return ps
}

// Close stops watching and closes every device.
func (a *AutoInput) Close() error {
	a.mu.Lock()
	a.closed = true
	for _, s := range a.open {
		s.Close()
	}
	a.mu.Unlock()
	a.cancel()
	a.wg.Wait()
	return nil
}

// Next returns the next edge of the key on any of the devices. A device
// that goes away mid-press yields a Reset edge, so that press is dropped.
func (a *AutoInput) Next(ctx context.Context) (Edge, error) {
	select {
	case e := <-a.edges:
		return e, nil
	case <-ctx.Done():
		return Edge{}, ctx.Err()
	}
}

func (a *AutoInput) scan(ctx context.Context) {
	ents, err := os.ReadDir(a.dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("button: scanning input devices", "dir", a.dir, "err", err)
		}
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "event") {
			continue
		}
		path := filepath.Join(a.dir, e.Name())
		a.mu.Lock()
		_, known := a.open[path]
		a.mu.Unlock()
		if known {
			continue
		}
		ctime, ok := changeTime(path)
		if t, seen := a.rejected[path]; ok && seen && t.Equal(ctime) {
			continue
		}
		s, why := a.try(path)
		if s == nil {
			a.rejected[path] = ctime
			a.log.Debug("button: input device not used", "device", path, "why", why)
			continue
		}
		delete(a.rejected, path)
		a.mu.Lock()
		if a.closed {
			a.mu.Unlock()
			s.Close()
			return
		}
		a.open[path] = s
		a.wg.Add(1) // under mu: never after Close's Wait began
		a.mu.Unlock()
		a.log.Info("button: watching input device", "device", path, "key_code", a.code)
		go a.read(ctx, path, s)
	}
}

// changeTime is the node's inode change time (ok false if it cannot be
// read): a device node made anew has a new one.
func changeTime(path string) (time.Time, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return time.Time{}, false
	}
	return time.Unix(st.Ctim.Unix()), true
}

// try opens path if it is an evdev device with the key that is not on
// Bluetooth.
func (a *AutoInput) try(path string) (*InputSource, string) {
	// Only character devices: opening anything else (a FIFO) could block.
	if fi, err := os.Stat(path); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return nil, "not a character device"
	}
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err.Error()
	}
	ok, why := hasKey(f, a.code)
	if !ok {
		f.Close()
		return nil, why
	}
	s, err := NewInputSource(f, a.code, a.layout)
	if err != nil {
		f.Close()
		return nil, err.Error()
	}
	return s, ""
}

func (a *AutoInput) read(ctx context.Context, path string, s *InputSource) {
	defer a.wg.Done()
	for {
		e, err := s.Next(ctx)
		if err != nil {
			a.mu.Lock()
			delete(a.open, path)
			a.mu.Unlock()
			s.Close()
			if ctx.Err() == nil {
				a.log.Info("button: input device gone", "device", path, "err", err)
				select { // a press in progress on it is void
				case a.edges <- Edge{Reset: true}:
				case <-ctx.Done():
				}
			}
			return
		}
		select {
		case a.edges <- e:
		case <-ctx.Done():
			return
		}
	}
}

// The evdev ioctls (include/uapi/linux/input.h); x/sys/unix has no helpers.
const (
	busBluetooth = 0x05
	keyMax       = 0x2ff
)

func eviocgbit(ev, n uintptr) uintptr { return 2<<30 | n<<16 | 'E'<<8 | (0x20 + ev) }

const eviocgid = 2<<30 | 8<<16 | 'E'<<8 | 0x02 // struct input_id: 4 x u16

// hasKey asks an evdev device whether it can send key code, and refuses a
// Bluetooth one. Anything that is not an evdev device fails the ioctl.
func hasKey(f *os.File, code uint16) (bool, string) {
	var id [4]uint16
	if err := ioctl(f, eviocgid, unsafe.Pointer(&id)); err != nil {
		return false, "not an evdev device: " + err.Error()
	}
	if id[0] == busBluetooth {
		return false, "a Bluetooth device: a press must be physical presence"
	}
	var bits [keyMax/8 + 1]byte
	if err := ioctl(f, eviocgbit(1 /* EV_KEY */, uintptr(len(bits))), unsafe.Pointer(&bits)); err != nil {
		return false, "EVIOCGBIT(EV_KEY): " + err.Error()
	}
	if int(code) > keyMax || bits[code/8]&(1<<(code%8)) == 0 {
		return false, fmt.Sprintf("has no key %#x", code)
	}
	return true, ""
}

func ioctl(f *os.File, req uintptr, arg unsafe.Pointer) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errors.New(errno.Error())
	}
	return nil
}
