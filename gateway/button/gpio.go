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

	"golang.org/x/sys/unix"
)

// GPIO uAPI v2 line flags (include/uapi/linux/gpio.h, enum
// gpio_v2_line_flag); golang.org/x/sys/unix has the structs and ioctl
// numbers but not these.
const (
	gpioFlagActiveLow    = 1 << 1
	gpioFlagInput        = 1 << 2
	gpioFlagEdgeRising   = 1 << 4
	gpioFlagEdgeFalling  = 1 << 5
	gpioFlagBiasPullUp   = 1 << 8
	gpioFlagBiasPullDown = 1 << 9
	gpioFlagBiasDisabled = 1 << 10
)

// GPIOEventSize is the size of struct gpio_v2_line_event.
const GPIOEventSize = 48

// Bias is the line's pull resistor setting.
type Bias string

// The biases the GPIO uAPI can request.
const (
	BiasAsIs     Bias = ""
	BiasPullUp   Bias = "pull-up"
	BiasPullDown Bias = "pull-down"
	BiasDisabled Bias = "disabled"
)

// GPIOConfig says how the button is wired.
type GPIOConfig struct {
	// ActiveLow: the line reads 0 while the button is pressed (the usual
	// wiring: a switch to ground with a pull-up).
	ActiveLow bool
	// Bias of the line; BiasAsIs leaves the board's setting.
	Bias Bias
	// KernelDebounce asks the GPIO driver to debounce in hardware or in
	// the kernel; 0 leaves it to the Watcher alone.
	KernelDebounce time.Duration
	// Consumer labels the line in gpioinfo; default "bastion-button".
	Consumer string
}

// lineRequest builds the GPIO_V2_GET_LINE_IOCTL argument for one input
// line with both edges reported.
func lineRequest(offset uint32, c GPIOConfig) (unix.GPIOV2LineRequest, error) {
	var r unix.GPIOV2LineRequest
	consumer := c.Consumer
	if consumer == "" {
		consumer = "bastion-button"
	}
	if len(consumer) >= len(r.Consumer) {
		return r, fmt.Errorf("gpio consumer %q: at most %d bytes", consumer, len(r.Consumer)-1)
	}
	r.Offsets[0] = offset
	copy(r.Consumer[:], consumer)
	r.Num_lines = 1
	r.Config.Flags = gpioFlagInput | gpioFlagEdgeRising | gpioFlagEdgeFalling
	if c.ActiveLow {
		r.Config.Flags |= gpioFlagActiveLow
	}
	switch c.Bias {
	case BiasAsIs:
	case BiasPullUp:
		r.Config.Flags |= gpioFlagBiasPullUp
	case BiasPullDown:
		r.Config.Flags |= gpioFlagBiasPullDown
	case BiasDisabled:
		r.Config.Flags |= gpioFlagBiasDisabled
	default:
		return r, fmt.Errorf("gpio bias %q: want pull-up, pull-down, disabled or empty", c.Bias)
	}
	if c.KernelDebounce < 0 || c.KernelDebounce > time.Second {
		return r, fmt.Errorf("gpio kernel debounce %v: want 0 to 1s", c.KernelDebounce)
	}
	if us := uint64(c.KernelDebounce / time.Microsecond); us > 0 {
		// debounce_period_us is a u32 in a union with a u64: on a
		// big-endian machine it occupies the u64's high half.
		v := us
		if binary.NativeEndian.Uint16([]byte{0, 1}) == 1 {
			v = us << 32
		}
		r.Config.Num_attrs = 1
		r.Config.Attrs[0].Attr.Id = unix.GPIO_V2_LINE_ATTR_ID_DEBOUNCE
		r.Config.Attrs[0].Attr.Flags = v
		r.Config.Attrs[0].Mask = 1 // bit 0: the first (only) requested line
	}
	return r, nil
}

// GPIOEvent is one decoded struct gpio_v2_line_event.
type GPIOEvent struct {
	Timestamp time.Duration // timestamp_ns, CLOCK_MONOTONIC by default
	Rising    bool          // id: GPIO_V2_LINE_EVENT_RISING_EDGE, else falling
	Offset    uint32
	Seqno     uint32
	LineSeqno uint32
}

// DecodeGPIOEvent decodes one gpio_v2_line_event (native byte order).
func DecodeGPIOEvent(b []byte) (GPIOEvent, error) {
	if len(b) < GPIOEventSize {
		return GPIOEvent{}, fmt.Errorf("decode gpio event: %w: %d bytes, want %d", ErrMalformedEvent, len(b), GPIOEventSize)
	}
	ne := binary.NativeEndian
	ts := ne.Uint64(b[0:])
	if ts > math.MaxInt64 {
		return GPIOEvent{}, fmt.Errorf("decode gpio event: %w: timestamp %d out of range", ErrMalformedEvent, ts)
	}
	e := GPIOEvent{Timestamp: time.Duration(ts), Offset: ne.Uint32(b[12:]), Seqno: ne.Uint32(b[16:]), LineSeqno: ne.Uint32(b[20:])}
	switch id := ne.Uint32(b[8:]); id {
	case unix.GPIO_V2_LINE_EVENT_RISING_EDGE:
		e.Rising = true
	case unix.GPIO_V2_LINE_EVENT_FALLING_EDGE:
	default:
		return GPIOEvent{}, fmt.Errorf("decode gpio event: %w: event id %d, want 1 (rising) or 2 (falling)", ErrMalformedEvent, id)
	}
	return e, nil
}

// AppendGPIOEvent encodes e as the kernel would (padding zeroed).
func AppendGPIOEvent(b []byte, e GPIOEvent) []byte {
	ne := binary.NativeEndian
	b = ne.AppendUint64(b, uint64(e.Timestamp))
	id := uint32(unix.GPIO_V2_LINE_EVENT_FALLING_EDGE)
	if e.Rising {
		id = unix.GPIO_V2_LINE_EVENT_RISING_EDGE
	}
	b = ne.AppendUint32(b, id)
	b = ne.AppendUint32(b, e.Offset)
	b = ne.AppendUint32(b, e.Seqno)
	b = ne.AppendUint32(b, e.LineSeqno)
	return append(b, make([]byte, 24)...)
}

// GPIOSource reads edge events of one requested GPIO line. With
// ActiveLow requested, the kernel reports logical edges, so a rising edge
// is always a press.
type GPIOSource struct {
	f       *os.File
	name    string
	offset  uint32
	lastSeq uint32
	held    *Edge // an edge held back behind a Reset
	buf     [GPIOEventSize]byte
}

// NewGPIOSource reads gpio_v2_line_event records of line offset from f, a
// line request file descriptor (or a pipe carrying the same bytes).
func NewGPIOSource(f *os.File, offset uint32) *GPIOSource {
	return &GPIOSource{f: f, name: f.Name(), offset: offset}
}

// OpenGPIO requests line offset of chip (e.g. /dev/gpiochip0) as an input
// with both edges reported, and returns a source reading it.
func OpenGPIO(chip string, offset uint32, c GPIOConfig) (*GPIOSource, error) {
	req, err := lineRequest(offset, c)
	if err != nil {
		return nil, fmt.Errorf("request gpio %s line %d: %w", chip, offset, err)
	}
	cf, err := os.OpenFile(chip, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open gpio chip %s: %w (check button.gpio.chip)", chip, err)
	}
	defer cf.Close()
	sc, err := cf.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("open gpio chip %s: %w", chip, err)
	}
	var ioErr error
	if err := sc.Control(func(fd uintptr) {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.GPIO_V2_GET_LINE_IOCTL, uintptr(unsafe.Pointer(&req)))
		if errno != 0 {
			ioErr = errno
		}
	}); err != nil {
		return nil, fmt.Errorf("request gpio %s line %d: %w", chip, offset, err)
	}
	if ioErr != nil {
		return nil, fmt.Errorf("request gpio %s line %d (GPIO_V2_GET_LINE_IOCTL): %w (is it a GPIO chip with uAPI v2, kernel >= 5.10, and is the line free?)", chip, offset, ioErr)
	}
	if err := unix.SetNonblock(int(req.Fd), true); err != nil {
		unix.Close(int(req.Fd))
		return nil, fmt.Errorf("gpio %s line %d: set non-blocking: %w", chip, offset, err)
	}
	return NewGPIOSource(os.NewFile(uintptr(req.Fd), fmt.Sprintf("%s:%d", chip, offset)), offset), nil
}

// Name is chip:line.
func (s *GPIOSource) Name() string { return s.name }

// Close releases the line.
func (s *GPIOSource) Close() error { return s.f.Close() }

// Next returns the next edge. A gap in the line's sequence numbers (the
// kernel's event buffer overflowed) yields a Reset edge first.
func (s *GPIOSource) Next(ctx context.Context) (Edge, error) {
	if s.held != nil {
		e := *s.held
		s.held = nil
		return e, nil
	}
	stop := context.AfterFunc(ctx, func() { s.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := io.ReadFull(s.f, s.buf[:]); err != nil {
		if ctx.Err() != nil {
			return Edge{}, ctx.Err()
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return Edge{}, fmt.Errorf("read %s: line released: %w", s.name, err)
		}
		return Edge{}, fmt.Errorf("read %s: %w", s.name, err)
	}
	ev, err := DecodeGPIOEvent(s.buf[:])
	if err != nil {
		return Edge{}, fmt.Errorf("read %s: %w", s.name, err)
	}
	if ev.Offset != s.offset {
		return Edge{}, fmt.Errorf("read %s: %w: event for line %d, requested %d", s.name, ErrMalformedEvent, ev.Offset, s.offset)
	}
	e := Edge{Pressed: ev.Rising, At: ev.Timestamp}
	gap := s.lastSeq != 0 && ev.LineSeqno != s.lastSeq+1
	s.lastSeq = ev.LineSeqno
	if gap {
		s.held = &e
		return Edge{Reset: true, At: ev.Timestamp}, nil
	}
	return e, nil
}
