package otacache

import (
	"testing"

	"github.com/pion/dtls/v3/pkg/crypto/ciphersuite"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// BenchmarkRecordEncrypt measures pion/dtls's record encryption for the two
// suites the gateway offers, on one firmware block's record (1024-byte
// block + CoAP header and options ≈ 1040 bytes of plaintext): it shows how
// much of the firmware benchmark's CPU is the cipher. Run:
//
//	go test -run '^$' -bench RecordEncrypt ./ota-cache/
func BenchmarkRecordEncrypt(b *testing.B) {
	key := make([]byte, 16)
	iv := make([]byte, 4)
	ccm8, err := ciphersuite.NewCCM(ciphersuite.CCMTagLength8, key, iv, key, iv)
	if err != nil {
		b.Fatal(err)
	}
	gcm, err := ciphersuite.NewGCM(key, iv, key, iv)
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		enc  func(*recordlayer.RecordLayer, []byte) ([]byte, error)
	}{{"CCM_8", ccm8.Encrypt}, {"GCM", gcm.Encrypt}} {
		b.Run(c.name, func(b *testing.B) {
			hdr := recordlayer.Header{ContentType: protocol.ContentTypeApplicationData, Version: protocol.Version1_2, Epoch: 1, SequenceNumber: 1}
			hraw, err := hdr.Marshal()
			if err != nil {
				b.Fatal(err)
			}
			raw := make([]byte, len(hraw)+1040)
			copy(raw, hraw)
			pkt := &recordlayer.RecordLayer{Header: hdr}
			buf := make([]byte, len(raw))
			b.SetBytes(1040)
			b.ReportAllocs()
			for b.Loop() {
				copy(buf, raw)
				if _, err := c.enc(pkt, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
