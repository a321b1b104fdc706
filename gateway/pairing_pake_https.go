package gateway

import (
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/pki/est"
)

// Setup-code enrollment over HTTPS, for MQTT-only devices, on the EST
// listener (open only with the window). The exchange is the CoAPS one
// with HTTPS in place of the two DTLS sessions: the PAKE messages go
// through PAKE, as on CoAPS (window, code book, audit and metrics alike),
// and the enrollment through beginEnrol and finishEnrol. What DTLS-PSK
// does there, keying the session with the PAKE's key, MACs do here
// (est.PAKEKeys): the device sees a TLS certificate it cannot check, so
// the CSR and the answer carry MACs keyed by the PAKE and bound to this
// TLS connection's exporter. The protocol is in gateway/pairing/README.md.

// maxPAKEBody bounds a PAKE message (pairing.PAKEMessage: three fields of
// at most 256 bytes).
const maxPAKEBody = 1 << 10

// pakeDevice is the label id a request names (?device=): the session
// identity DTLS gives the CoAPS exchange, which HTTP has not.
func pakeDevice(r *http.Request) (string, error) {
	id := r.URL.Query().Get("device")
	if id == "" || len(id) > 128 {
		return "", errors.New("name the device: ?device=<the id on its label>, 1-128 bytes")
	}
	return id, nil
}

func readBody(r *http.Request, limit int) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, int64(limit)+1))
	if err != nil {
		return nil, fmt.Errorf("read the request body: %w", err)
	}
	if len(b) > limit {
		return nil, fmt.Errorf("request body over %d bytes", limit)
	}
	return b, nil
}

// estPAKE carries one PAKE round: hello, then round 2.
func (p *pairingSvc) estPAKE(w http.ResponseWriter, r *http.Request) {
	id, err := pakeDevice(r)
	if err != nil {
		p.refuseMessage("PAKE message refused", "bad identity", "", err.Error())
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	msg, err := readBody(r, maxPAKEBody)
	if err != nil {
		p.refuseMessage("PAKE message refused", "malformed", id, err.Error())
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	reply, err := p.PAKE(r.Context(), idPAKE+id, msg)
	if err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Write(reply)
}

// estPAKEEnroll takes the sealed CSR of a device whose exchange completed
// in this window and answers its certificate and the CA chain, sealed.
func (p *pairingSvc) estPAKEEnroll(w http.ResponseWriter, r *http.Request) {
	id, err := pakeDevice(r)
	if err != nil {
		p.refuseMessage("enrollment request refused", "bad identity", "", err.Error())
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	log := p.g.log.With("device", ratelog.Clip(id, maxPairingClaim), "listener", "est")
	if err := p.enrolOpen(id); err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	p.mu.Lock()
	pe := p.pending[id]
	p.mu.Unlock()
	if pe == nil || p.win.State().Enrolling != id {
		p.refuseMessage("enrollment request refused", "no exchange", id, "enrollment request without a setup-code exchange completed for this device in the open window")
		http.Error(w, "no setup-code exchange completed for this device in the open window: start again with a hello", http.StatusForbidden)
		return
	}
	if r.TLS == nil {
		http.Error(w, "TLS required", http.StatusForbidden)
		return
	}
	exporter, err := r.TLS.ExportKeyingMaterial(est.PAKEExporterLabel, nil, est.ExporterSize)
	if err != nil {
		// TLS 1.2 without extended master secret: nothing binds the MACs
		// to this connection.
		http.Error(w, "TLS exporter: "+err.Error()+": use TLS 1.3", http.StatusForbidden)
		return
	}
	keys, err := est.NewPAKEKeys(pe.psk)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	body, err := readBody(r, est.MaxSealed)
	if err != nil {
		p.refuseMessage("enrollment request refused", "malformed", id, err.Error())
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	csr, err := keys.OpenEnroll(exporter, body)
	if err != nil {
		// Anyone on the LAN can post here while the exchange is pending;
		// failing the attempt would let them end the device's. A MAC they
		// cannot make costs them nothing to try, so nothing is counted
		// against the window: the request is refused, counted and
		// audited (spaced).
		p.refuseMessage("enrollment request refused", "bad seal", id, err.Error())
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	en, err := p.beginEnrol(idEnroll+id, nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	en.method = "setup-code-https"
	resp := est.Handler{Issuer: caIssuer{p.g}}.Handle(r.Context(), est.Request{Method: "POST", Path: est.PathSen,
		ContentFormat: est.FormatPKCS10, Accept: est.FormatCertsOnly, Payload: csr, DeviceID: en.opID})
	if resp.Issued == nil {
		en.fail("EST over HTTPS refused: " + errString(resp.Err))
		http.Error(w, string(resp.Payload), http.StatusBadRequest)
		return
	}
	cacerts, err := est.EncodeCertsOnly(p.g.ca.Chain())
	if err == nil {
		// Sealed before the commit: once committed, the answer must go.
		body, err = keys.SealIssued(exporter, csr, resp.Payload, cacerts)
	}
	if err != nil {
		en.fail("answer not sealed: " + err.Error())
		log.Error("pairing: setup-code enrollment over HTTPS: answer not sealed", "err", err)
		http.Error(w, "answer not sealed", http.StatusInternalServerError)
		return
	}
	if err := p.finishEnrol(en, store.Device{Auth: "cert"}, resp.Issued); err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Write(body)
}
