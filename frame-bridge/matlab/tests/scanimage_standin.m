function scanimage_standin(port, token_file, frames, width, height, pace_s)
% SCANIMAGE_STANDIN  Drive rigBridgeFrameAcquired as ScanImage would, in Octave.
%
% A stand-in for the ScanImage object the user function reads
% (src.hSI.hDisplay.lastStripeData: frameNumberAcq, frameTimestamp,
% roiData{1}.imageData{1}{1}); frame k's image is (r-1)*width + (c-1) + k at
% line r, pixel c. Calls the user function once per frame (pace_s apart),
% closes it, and prints one RESULT line with the sender's counts.
  here = fileparts(mfilename('fullpath'));
  addpath(fileparts(here));
  base = int16(reshape(0:width * height - 1, width, height).');   % (r, c) = (r-1)*width + c-1
  src = struct();
  evt = struct('EventName', 'frameAcquired');
  calls_ms = zeros(1, frames);
  for k = 1:frames
    sd = struct();
    sd.frameNumberAcq = k;
    sd.frameTimestamp = k / 30;
    sd.roiData = {struct('imageData', {{{base + int16(k)}}})};
    src.hSI.hDisplay.lastStripeData = sd;
    t = tic();
    rigBridgeFrameAcquired(src, evt, 'port', port, 'tokenFile', token_file, 'channel', 1);
    calls_ms(k) = toc(t) * 1e3;
    if pace_s > 0
      pause(pace_s);
    end
  end
  st = rigBridgeFrameAcquired('close');
  c = sort(calls_ms);
  printf('RESULT queued=%d sent=%d dropped=%d written=%d connects=%d call_ms_p50=%.3f call_ms_max=%.3f last_error=%s\n', ...
         st.queued, st.sent, st.dropped, st.written, st.connects, c(ceil(end / 2)), c(end), st.last_error);
end
