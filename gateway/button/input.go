package button

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"time"
	"unsafe"
)

// Linux input event constants (include/uapi/linux/input-event-codes.h).
const (
	EvSyn = 0x00
	EvKey = 0x01

	SynReport  = 0
	SynDropped = 3

	// KeyWPSButton is KEY_WPS_BUTTON, the default pairing key.
	KeyWPSButton = 0x211
)

// Layout is the size of struct input_event on the kernel's ABI: a struct
// timeval (two longs) then type u16, code u16, value s32.
type Layout int

const (
	// Layout64 is 64-bit userland (x86-64, arm64): 24 bytes.
	Layout64 Layout = 24
	// Layout32 is 32-bit userland (armv7, mipsle): 16 bytes. Its seconds
	// are read unsigned, as the kernel writes them for 64-bit time_t.
	Layout32 Layout = 16
)

// NativeLayout is the layout of the running program's word size.
func NativeLayout() Layout {
	if unsafe.Sizeof(uintptr(0)) == 8 {
		return Layout64
	}
	return Layout32
}

// ParseLayout reads "64", "32" or "native" (the config key's values).
func ParseLayout(s string) (Layout, error) {
	switch s {
	case "", "native":
		return NativeLayout(), nil
	case "64":
		return Layout64, nil
	case "32":
		return Layout32, nil
	}
	return 0, fmt.Errorf("input event layout %q: want 64, 32 or native", s)
}

// Size is the encoded size of one event.
func (l Layout) Size() int { return int(l) }

func (l Layout) valid() bool { return l == Layout64 || l == Layout32 }

// InputEvent is one decoded struct input_event.
type InputEvent struct {
	// Time is the kernel's timestamp as a duration since its epoch.
	Time  time.Duration
	Type  uint16
	Code  uint16
	Value int32
}

// ErrMalformedEvent wraps every refusal of a malformed event.
var ErrMalformedEvent = errors.New("malformed event")

const maxSec = math.MaxInt64/int64(time.Second) - 1

// DecodeInputEvent decodes one event of layout l from the start of b, in
// the machine's byte order (evdev writes native order).
func DecodeInputEvent(b []byte, l Layout) (InputEvent, error) {
	if !l.valid() {
		return InputEvent{}, fmt.Errorf("decode input event: layout %d: want 16 or 24", int(l))
	}
	if len(b) < l.Size() {
		return InputEvent{}, fmt.Errorf("decode input event: %w: %d bytes, want %d", ErrMalformedEvent, len(b), l.Size())
	}
	ne := binary.NativeEndian
	var sec, usec int64
	var rest []byte
	if l == Layout64 {
		sec, usec = int64(ne.Uint64(b[0:])), int64(ne.Uint64(b[8:]))
		rest = b[16:24]
	} else {
		sec, usec = int64(ne.Uint32(b[0:])), int64(ne.Uint32(b[4:]))
		rest = b[8:16]
	}
	if sec < 0 || sec > maxSec || usec < 0 || usec >= 1e6 {
		return InputEvent{}, fmt.Errorf("decode input event: %w: timestamp %d s %d us out of range", ErrMalformedEvent, sec, usec)
	}
	return InputEvent{
		Time:  time.Duration(sec)*time.Second + time.Duration(usec)*time.Microsecond,
		Type:  ne.Uint16(rest[0:]),
		Code:  ne.Uint16(rest[2:]),
		Value: int32(ne.Uint32(rest[4:])),
	}, nil
}

// AppendInputEvent encodes e in layout l, native byte order. The time is
// truncated to microseconds as the kernel's timeval carries it.
func AppendInputEvent(b []byte, e InputEvent, l Layout) []byte {
	ne := binary.NativeEndian
	sec, usec := int64(e.Time/time.Second), int64(e.Time%time.Second/time.Microsecond)
	if l == Layout64 {
		b = ne.AppendUint64(b, uint64(sec))
		b = ne.AppendUint64(b, uint64(usec))
	} else {
		b = ne.AppendUint32(b, uint32(sec))
		b = ne.AppendUint32(b, uint32(usec))
	}
	b = ne.AppendUint16(b, e.Type)
	b = ne.AppendUint16(b, e.Code)
	return ne.AppendUint32(b, uint32(e.Value))
}

// InputSource reads key edges of one key code from an evdev device (or
// anything carrying the same bytes, such as a pipe).
type InputSource struct {
	f      *os.File
	name   string
	code   uint16
	layout Layout
	buf    []byte
	n      int
}

// NewInputSource reads events of layout l from f and reports edges of key
// code. f should be pollable (an evdev node or a pipe) so that Next can be
// cancelled.
func NewInputSource(f *os.File, code uint16, l Layout) (*InputSource, error) {
	if !l.valid() {
		return nil, fmt.Errorf("input source %s: layout %d: want 16 or 24", f.Name(), int(l))
	}
	return &InputSource{f: f, name: f.Name(), code: code, layout: l, buf: make([]byte, 64*l.Size())}, nil
}

// OpenInput opens an evdev node such as /dev/input/event3.
func OpenInput(path string, code uint16, l Layout) (*InputSource, error) {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open button input device %s: %w (is the path in button.input right, and is the daemon allowed to read it?)", path, err)
	}
	s, err := NewInputSource(f, code, l)
	if err != nil {
		f.Close()
		return nil, err
	}
	return s, nil
}

// Name is the device path.
func (s *InputSource) Name() string { return s.name }

// Close closes the device.
func (s *InputSource) Close() error { return s.f.Close() }

// Next returns the next press or release of the configured key. Autorepeat
// events are skipped; SYN_DROPPED yields a Reset edge.
func (s *InputSource) Next(ctx context.Context) (Edge, error) {
	stop := context.AfterFunc(ctx, func() { s.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	size := s.layout.Size()
	for {
		for s.n >= size {
			ev, err := DecodeInputEvent(s.buf[:size], s.layout)
			copy(s.buf, s.buf[size:s.n])
			s.n -= size
			if err != nil {
				return Edge{}, fmt.Errorf("read %s: %w", s.name, err)
			}
			switch {
			case ev.Type == EvSyn && ev.Code == SynDropped:
				return Edge{Reset: true, At: ev.Time}, nil
			case ev.Type == EvKey && ev.Code == s.code && (ev.Value == 0 || ev.Value == 1):
				return Edge{Pressed: ev.Value == 1, At: ev.Time}, nil
			}
		}
		m, err := s.f.Read(s.buf[s.n:])
		s.n += m
		if err != nil {
			if ctx.Err() != nil {
				return Edge{}, ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return Edge{}, fmt.Errorf("read %s: device closed or unplugged: %w", s.name, err)
			}
			return Edge{}, fmt.Errorf("read %s: %w", s.name, err)
		}
	}
}
