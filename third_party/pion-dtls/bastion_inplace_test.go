// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, (7)): application
// data records of an established connection are sealed in place, with the
// bytes and the sequence numbers of pion's generic path.

package dtls

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

var bastionInPlaceSuites = []CipherSuiteID{
	TLS_PSK_WITH_AES_128_CCM_8,
	TLS_PSK_WITH_AES_128_GCM_SHA256,
	TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
	TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
}

// TestBastionInPlaceSealMatchesGeneric checks that the in-place path
// (sealApplicationData) writes exactly the bytes of the generic path
// (processPacket) and takes the same sequence numbers, for AES-CCM-8 and
// AES-GCM, with and without a connection ID; and that the peer's cipher
// opens them to the payload.
func TestBastionInPlaceSealMatchesGeneric(t *testing.T) {
	master := bytes.Repeat([]byte{0x42}, 48)
	clientRandom := bytes.Repeat([]byte{0x01}, 32)
	serverRandom := bytes.Repeat([]byte{0x02}, 32)
	for _, id := range bastionInPlaceSuites {
		for _, cid := range [][]byte{nil, {1, 2, 3, 4, 5, 6, 7, 8}, {9}} {
			for _, size := range []int{0, 1, 13, 100, 1152, maxInPlacePayload} {
				for _, seq := range []uint64{0, 1, 1<<40 + 7, recordlayer.MaxSequenceNumber - 1} {
					name := fmt.Sprintf("%v/cid=%x/len=%d/seq=%d", id, cid, size, seq)
					payload := make([]byte, size)
					for i := range payload {
						payload[i] = byte(i*7 + size)
					}
					server := cipherSuiteForID(id, nil)
					if err := server.Init(master, clientRandom, serverRandom, false); err != nil {
						t.Fatal(err)
					}
					c := &Conn{}
					c.state.cipherSuite = server
					c.state.remoteConnectionID = cid

					c.state.localSequenceNumber = []uint64{0, seq}
					want, err := c.processPacket(&packet{
						record: &recordlayer.RecordLayer{
							Header:  recordlayer.Header{Epoch: 1, Version: protocol.Version1_2},
							Content: &protocol.ApplicationData{Data: payload},
						},
						shouldWrapCID: len(cid) > 0,
						shouldEncrypt: true,
					})
					if err != nil {
						t.Fatalf("%s: generic: %v", name, err)
					}
					wantNext := c.state.localSequenceNumber[1]

					c.state.localSequenceNumber = []uint64{0, seq}
					got, done, err := c.sealApplicationData(make([]byte, 0, 64+size), 1, payload)
					if err != nil || !done {
						t.Fatalf("%s: in place: done=%v err=%v", name, done, err)
					}
					if !bytes.Equal(want, got) {
						t.Fatalf("%s: in-place record differs (-want +got):\n-%s\n+%s", name, hex.EncodeToString(want), hex.EncodeToString(got))
					}
					if next := c.state.localSequenceNumber[1]; next != wantNext {
						t.Fatalf("%s: next sequence number %d, want %d", name, next, wantNext)
					}

					client := cipherSuiteForID(id, nil)
					if err := client.Init(master, clientRandom, serverRandom, true); err != nil {
						t.Fatal(err)
					}
					var hdr recordlayer.Header
					if len(cid) > 0 {
						hdr.ConnectionID = make([]byte, len(cid))
					}
					plain, err := client.Decrypt(hdr, append([]byte(nil), got...))
					if err != nil {
						t.Fatalf("%s: peer cannot open the record: %v", name, err)
					}
					h := recordlayer.Header{ConnectionID: hdr.ConnectionID}
					if err := h.Unmarshal(plain); err != nil {
						t.Fatal(err)
					}
					content := plain[recordlayer.FixedHeaderSize:]
					if len(cid) > 0 {
						var ip recordlayer.InnerPlaintext
						if err := ip.Unmarshal(plain[h.Size():]); err != nil || ip.RealType != protocol.ContentTypeApplicationData {
							t.Fatalf("%s: inner plaintext %+v: %v", name, ip, err)
						}
						content = ip.Content
					}
					if !bytes.Equal(content, payload) {
						t.Fatalf("%s: peer opened %x, want %x", name, content, payload)
					}
				}
			}
		}
	}
}

// TestBastionInPlaceSealOverflow: the in-place path refuses the sequence
// number after the last, as processPacket does.
func TestBastionInPlaceSealOverflow(t *testing.T) {
	cs := cipherSuiteForID(TLS_PSK_WITH_AES_128_CCM_8, nil)
	if err := cs.Init(make([]byte, 48), make([]byte, 32), make([]byte, 32), false); err != nil {
		t.Fatal(err)
	}
	c := &Conn{}
	c.state.cipherSuite = cs
	c.state.localSequenceNumber = []uint64{0, recordlayer.MaxSequenceNumber + 1}
	if _, _, err := c.sealApplicationData(nil, 1, []byte("x")); err != errSequenceNumberOverflow { //nolint:errorlint
		t.Fatalf("sealApplicationData after the last sequence number: %v, want %v", err, errSequenceNumberOverflow)
	}
}
