// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package ciphersuite

import (
	"bytes"
	"testing"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// TestBastionAppendAEADAdditionalData: the additional data the Bastion
// patch writes into the pooled scratch equals pion's, with and without a
// connection ID (also one longer than the scratch's room).
func TestBastionAppendAEADAdditionalData(t *testing.T) {
	for _, cid := range [][]byte{nil, {1}, bytes.Repeat([]byte{7}, 8), bytes.Repeat([]byte{9}, 40)} {
		for _, seq := range []uint64{0, 1, 0x0000123456789abc, recordlayer.MaxSequenceNumber} {
			for _, n := range []int{0, 1, 1024, 65535} {
				h := recordlayer.Header{
					ContentType:    protocol.ContentTypeApplicationData,
					Version:        protocol.Version1_2,
					Epoch:          0x0102,
					SequenceNumber: seq,
				}
				want := generateAEADAdditionalData(&h, n)
				if len(cid) > 0 {
					h.ContentType = protocol.ContentTypeConnectionID
					h.ConnectionID = cid
					want = generateAEADAdditionalDataCID(&h, n)
				}
				scratch := make([]byte, 12, 12+aeadScratchExtra)
				got := appendAEADAdditionalData(scratch[12:], &h, n)
				if !bytes.Equal(want, got) {
					t.Fatalf("cid=%x seq=%d n=%d (-want +got):\n-%x\n+%x", cid, seq, n, want, got)
				}
			}
		}
	}
}
