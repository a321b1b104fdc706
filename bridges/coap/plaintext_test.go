package coap

import (
	"testing"

	"golang.org/x/net/bpf"
)

// The steering program decides in the kernel which datagrams pion sees;
// run it in x/net/bpf's VM on the first bytes of real datagrams.
func TestDTLSSteering(t *testing.T) {
	vm, err := bpf.NewVM(dtlsSteering())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		pkt  []byte
		want int // 0 pion, 1 guard
	}{
		{"DTLS ClientHello", []byte{22, 0xfe, 0xfd, 0, 0}, 0},
		{"DTLS application data", []byte{23, 0xfe, 0xfd}, 0},
		{"DTLS change cipher spec", []byte{20, 0xfe, 0xfd}, 0},
		{"DTLS 1.2 CID record", []byte{25, 0xfe, 0xfd}, 0},
		{"plaintext CoAP CON POST", []byte{0x44, 0x02, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef}, 1},
		{"plaintext CoAP NON GET", []byte{0x50, 0x01, 0, 1}, 1},
		{"below the DTLS types", []byte{19}, 1},
		{"above the DTLS types", []byte{26}, 1},
		{"zero", []byte{0}, 1},
		{"empty (program aborts: pion, which drops it)", nil, 0},
	} {
		// The kernel hands the program the UDP payload; the VM's "packet".
		got, err := vm.Run(c.pkt)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got != c.want {
			t.Errorf("%s: socket %d, want %d", c.name, got, c.want)
		}
	}
}

func TestSniff(t *testing.T) {
	for pkt, want := range map[string]string{
		"\x44\x02\x12\x34": "plaintext CoAP",
		"\x40\x01\x00\x01": "plaintext CoAP",
		"\x4f\x01\x00\x01": "not DTLS", // token length 15 is not CoAP
		"\xde\xad\xbe\xef": "not DTLS",
		"\x44":             "not DTLS",
	} {
		if got := sniff([]byte(pkt)); got != want {
			t.Errorf("sniff(%q) = %q, want %q", pkt, got, want)
		}
	}
}

// FuzzSteering runs the steering program and sniff on arbitrary datagrams
// (seeded with libcoap's plaintext captures and DTLS record headers): a
// datagram goes to pion exactly when it starts with a DTLS record type or
// is empty, and anything sniff calls plaintext CoAP goes to the guard.
func FuzzSteering(f *testing.F) {
	addCaptures(f)
	f.Add([]byte{22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{25, 0xfe, 0xfd})
	vm, err := bpf.NewVM(dtlsSteering())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, pkt []byte) {
		got, err := vm.Run(pkt)
		if err != nil {
			t.Fatal(err)
		}
		wantPion := len(pkt) == 0 || (pkt[0] >= 20 && pkt[0] <= 25)
		if (got == 0) != wantPion || got > 1 {
			t.Fatalf("datagram % x went to socket %d", pkt, got)
		}
		if sniff(pkt) == "plaintext CoAP" && got != 1 {
			t.Fatalf("plaintext CoAP % x went to pion", pkt)
		}
	})
}
