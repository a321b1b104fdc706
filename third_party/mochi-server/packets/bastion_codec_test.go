package packets

import (
	"bytes"
	"errors"
	"testing"
)

// TestBastionDecodeLengthFourBytes (Bastion patch (16)): a variable byte
// integer whose fourth byte has its continuation bit set is malformed, and
// DecodeLength reads no fifth byte. Upstream took a fifth byte of 0 (and
// any number of 0x80 before it) as adding nothing: 80 80 80 80 00 was a
// length of 0 in five bytes.
func TestBastionDecodeLengthFourBytes(t *testing.T) {
	cases := []struct {
		wire   []byte
		n, bu  int
		reject bool
	}{
		{wire: []byte{0x00}, n: 0, bu: 1},
		{wire: []byte{0x7f}, n: 127, bu: 1},
		{wire: []byte{0x80, 0x01}, n: 128, bu: 2},
		{wire: []byte{0x80, 0x80, 0x80, 0x01}, n: 2097152, bu: 4},
		{wire: []byte{0xff, 0xff, 0xff, 0x7f}, n: 268435455, bu: 4},
		{wire: []byte{0x80, 0x80, 0x80, 0x00}, n: 0, bu: 4}, // not minimal, but four bytes
		{wire: []byte{0x80, 0x80, 0x80, 0x80, 0x00}, reject: true},
		{wire: []byte{0xff, 0xff, 0xff, 0xff, 0x00}, reject: true},
		{wire: []byte{0x82, 0x80, 0x80, 0x80, 0x00}, reject: true},
		{wire: append(bytes.Repeat([]byte{0x80}, 100), 0x00), reject: true},
	}
	for _, c := range cases {
		r := bytes.NewReader(c.wire)
		n, bu, err := DecodeLength(r)
		read := len(c.wire) - r.Len()
		if c.reject {
			if !errors.Is(err, ErrMalformedVariableByteInteger) {
				t.Errorf("% x: got %d in %d bytes, err %v; want ErrMalformedVariableByteInteger", c.wire, n, bu, err)
			}
			if read > 4 {
				t.Errorf("% x: read %d bytes, want at most 4", c.wire, read)
			}
			continue
		}
		if err != nil || n != c.n || bu != c.bu || read != c.bu {
			t.Errorf("% x: got %d in %d bytes (read %d), err %v; want %d in %d", c.wire, n, bu, read, err, c.n, c.bu)
		}
	}
}
