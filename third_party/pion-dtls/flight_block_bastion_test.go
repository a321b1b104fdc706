// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package dtls

import (
	"reflect"
	"testing"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// The packets of a flightBlock (patch (49)) are the ones the generators
// made one by one, distinct from each other also past the block's size,
// and flight 6 generates the same packets as before the patch.
func TestBastionFlightBlock(t *testing.T) {
	blk := new(flightBlock)
	var got []*packet
	for i := range flightBlockSize + 2 {
		if i%2 == 0 {
			got = append(got, blk.handshake(&handshake.MessageServerHelloDone{}))
		} else {
			got = append(got, blk.record(&protocol.ChangeCipherSpec{}))
		}
	}
	for i, p := range got {
		var want *packet
		if i%2 == 0 {
			want = &packet{record: &recordlayer.RecordLayer{
				Header:  recordlayer.Header{Version: protocol.Version1_2},
				Content: &handshake.Handshake{Message: &handshake.MessageServerHelloDone{}},
			}}
		} else {
			want = &packet{record: &recordlayer.RecordLayer{
				Header:  recordlayer.Header{Version: protocol.Version1_2},
				Content: &protocol.ChangeCipherSpec{},
			}}
		}
		if !reflect.DeepEqual(p, want) {
			t.Fatalf("packet %d: %+v, want %+v", i, p, want)
		}
		p.record.Header.Epoch = uint16(i + 1) //nolint:gosec
	}
	for i, p := range got {
		if p.record.Header.Epoch != uint16(i+1) { //nolint:gosec
			t.Fatalf("packet %d shares its record with another", i)
		}
	}

	state := &State{localVerifyData: []byte{1, 2, 3}, remoteConnectionID: []byte{9}}
	pkts, alrt, err := flight6Generate(nil, state, newHandshakeCache(), &handshakeConfig{})
	if err != nil || alrt != nil {
		t.Fatal(alrt, err)
	}
	want := []*packet{
		{record: &recordlayer.RecordLayer{
			Header:  recordlayer.Header{Version: protocol.Version1_2},
			Content: &protocol.ChangeCipherSpec{},
		}},
		{
			record: &recordlayer.RecordLayer{
				Header: recordlayer.Header{Version: protocol.Version1_2, Epoch: 1},
				Content: &handshake.Handshake{
					Message: &handshake.MessageFinished{VerifyData: state.localVerifyData},
				},
			},
			shouldWrapCID:            true,
			shouldEncrypt:            true,
			resetLocalSequenceNumber: true,
		},
	}
	if !reflect.DeepEqual(pkts, want) {
		t.Fatalf("flight 6: %+v, want %+v", pkts, want)
	}
}
