package packets

import (
	"bytes"
	"reflect"
	"testing"
)

// TestBastionPropertiesIsEmpty: the zero Properties is empty, and setting
// any one field (every field, found by reflection, so that a field added
// upstream and not listed in isEmpty fails here) makes it not empty.
func TestBastionPropertiesIsEmpty(t *testing.T) {
	var zero Properties
	if !zero.isEmpty() {
		t.Fatal("zero Properties not empty")
	}
	typ := reflect.TypeOf(zero)
	for i := 0; i < typ.NumField(); i++ {
		var p Properties
		f := reflect.ValueOf(&p).Elem().Field(i)
		switch f.Kind() {
		case reflect.Slice:
			f.Set(reflect.MakeSlice(f.Type(), 1, 1))
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Uint8, reflect.Uint16, reflect.Uint32:
			f.SetUint(1)
		default:
			t.Fatalf("field %s: kind %s not covered by this test", typ.Field(i).Name, f.Kind())
		}
		if p.isEmpty() {
			t.Errorf("Properties with only %s set reported empty", typ.Field(i).Name)
		}
	}
}

// TestBastionAckFastPath: acks without properties (the fast path) encode to
// the same bytes as the general path, which an ack with a property that
// the packet type cannot carry still takes (it writes nothing for it), for
// both protocol versions and a success and an error reason code.
func TestBastionAckFastPath(t *testing.T) {
	for _, typ := range []byte{Puback, Pubrec, Pubrel, Pubcomp} {
		for _, ver := range []byte{4, 5} {
			for _, code := range []byte{CodeSuccess.Code, ErrQuotaExceeded.Code} {
				qos := byte(0)
				if typ == Pubrel {
					qos = 1
				}
				fast := Packet{FixedHeader: FixedHeader{Type: typ, Qos: qos}, PacketID: 0x1234, ReasonCode: code, ProtocolVersion: ver}
				slow := fast
				slow.Properties.ContentType = "not encodable in an ack"
				var fb, sb bytes.Buffer
				if err := fast.encodePubAckRelRecComp(&fb); err != nil {
					t.Fatal(err)
				}
				if err := slow.encodePubAckRelRecComp(&sb); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(fb.Bytes(), sb.Bytes()) {
					t.Errorf("type %d v%d code %#x: fast path % x, general path % x", typ, ver, code, fb.Bytes(), sb.Bytes())
				}
				if fast.FixedHeader.Remaining != slow.FixedHeader.Remaining {
					t.Errorf("type %d v%d code %#x: Remaining %d, general path %d", typ, ver, code, fast.FixedHeader.Remaining, slow.FixedHeader.Remaining)
				}
			}
		}
	}
}
