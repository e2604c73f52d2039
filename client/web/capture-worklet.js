// AudioWorklet processor: turns the microphone's float samples into PCM16 frames.
//
// It does NOT resample. The page sends audio at the AudioContext's own rate
// (`sample_rate=<context rate>` in the stream URL) and the server resamples it to 16 kHz
// with soxr. Why: a correct downsampler needs a proper low-pass filter (a naive
// decimation aliases hiss into the speech band and costs accuracy), soxr already is one
// and is exact for every rate 8-48 kHz, and browsers differ in which context rates they
// accept for a microphone source (Firefox refuses a 16 kHz context fed by a 48 kHz
// device). The cost is bandwidth: 48 kHz PCM16 is 96 kB/s instead of 32 kB/s, which
// does not matter on the networks a caption server runs on.
//
// Each posted message: {pcm: ArrayBuffer (Int16, little-endian, mono), rms, peak}.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const frameMs = (options.processorOptions && options.processorOptions.frameMs) || 100;
    // `sampleRate` is a global of the AudioWorkletGlobalScope: the context's rate.
    this.frameSamples = Math.max(128, Math.round((sampleRate * frameMs) / 1000));
    this.buffer = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.sumSquares = 0;
    this.peak = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "flush") this.flush();
      else if (event.data === "stop") {
        this.flush();
        this.running = false;
        this.port.postMessage({ stopped: true });
      }
    };
  }

  flush() {
    if (this.filled === 0) return;
    const pcm = this.buffer.slice(0, this.filled).buffer;
    const rms = Math.sqrt(this.sumSquares / this.filled);
    this.port.postMessage({ pcm, rms, peak: this.peak }, [pcm]);
    this.filled = 0;
    this.sumSquares = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      // Mono: the first channel (a microphone track is mono, or identical channels).
      const samples = input[0];
      for (let i = 0; i < samples.length; i++) {
        const s = Math.max(-1, Math.min(1, samples[i]));
        this.buffer[this.filled++] = s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff);
        this.sumSquares += s * s;
        const a = s < 0 ? -s : s;
        if (a > this.peak) this.peak = a;
        if (this.filled === this.frameSamples) this.flush();
      }
    }
    return this.running; // outputs stay silent: nothing is played back
  }
}

registerProcessor("whisperstream-capture", CaptureProcessor);
